"""Throughput figures for ``benchmarks/inference.py``: model FLOPs, published GPU peaks and FLOPs utilisation.

Model FLOPs utilisation (MFU) is the fraction of a device's peak that the model's own arithmetic uses:
``FLOPs per image x images per second / peak FLOP/s``. The FLOPs are counted once, on the eager model in fp32, by
:class:`torch.utils.flop_counter.FlopCounterMode` (matrix products, convolutions and attention; element-wise work is
not counted, as usual for MFU). The peak is the device's published dense (no sparsity) bf16 figure, so runs in any
precision are measured against the same yardstick.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from itertools import cycle, islice
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = [
    "PEAK_DENSE_BF16_TFLOPS",
    "count_flops",
    "cyclic_batches",
    "model_flops_utilisation",
    "published_peak_tflops",
]


def _attention_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    """The FLOPs torch counts for fused attention of these query, key and value shapes."""
    del args, kwargs
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# Fused attention as the CPU runs it: torch's counter knows only the GPU kernels.
_CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops}

# NVIDIA's data sheets, dense bf16 tensor-core TFLOP/s (half the "with sparsity" figure). Matched in this order, as
# whole words, against torch.cuda.get_device_name() (e.g. "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB").
PEAK_DENSE_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("GH200", 989.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),  # SXM
    ("A100", 312.0),  # SXM and PCIe
    ("L4", 121.0),
)


def published_peak_tflops(device_name: str) -> float | None:
    """The published dense bf16 peak of a GPU, in TFLOP/s, from its name; ``None`` for a GPU not in the table.

    Args:
        device_name: the name as ``torch.cuda.get_device_name()`` gives it.

    Returns:
        The peak of the first entry of :data:`PEAK_DENSE_BF16_TFLOPS` whose key is a whole word of the name.
    """
    for key, tflops in PEAK_DENSE_BF16_TFLOPS:
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", device_name, flags=re.IGNORECASE):
            return tflops
    return None


def count_flops(run: Callable[[torch.Tensor], Any], images: torch.Tensor) -> int:
    """FLOPs that ``run(images)`` performs (matrix products, convolutions, attention), counted while it runs.

    Work done once and then cached (AnomalyCLIP's text embeddings) is counted too: call ``run`` once before.

    Args:
        run: the model call, e.g. the anomalib module (pre-processing, model and post-processing).
        images: a batch of images.

    Returns:
        The total over the batch; divide by the batch size for FLOPs per image.
    """
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION)
    with counter, torch.inference_mode():
        run(images)
    return int(counter.get_total_flops())


def model_flops_utilisation(flops_per_image: float, images_per_second: float, peak_tflops: float) -> float:
    """The fraction of ``peak_tflops`` that ``images_per_second`` images of ``flops_per_image`` each use."""
    return flops_per_image * images_per_second / (peak_tflops * 1e12)


def cyclic_batches(images: list[torch.Tensor], batch_size: int, min_images: int) -> list[torch.Tensor]:
    """Whole batches of ``batch_size`` that hold at least ``min_images`` images, cycling through ``images``.

    The first ``len(images)`` images of the batches, taken in order, are ``images`` in order, so outputs of any
    batch size can be compared image by image.

    Args:
        images: single images, each (1, C, H, W).
        batch_size: images per batch.
        min_images: the batches hold at least this many images (and at least one batch).

    Returns:
        The batches, each (batch_size, C, H, W).
    """
    count = max(1, math.ceil(min_images / batch_size)) * batch_size
    stream = list(islice(cycle(images), count))
    return [torch.cat(stream[start : start + batch_size]) for start in range(0, count, batch_size)]

"""Figures of ``benchmarks/inference.py``: model FLOPs, published GPU peaks, FLOPs utilisation, batching."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from anomalib_anomalyclip import AnomalyCLIP
from anomalib_anomalyclip.testing.tiny_clip import TinyClipConfig
from anomalyclip_bench.throughput import (
    count_flops,
    cyclic_batches,
    model_flops_utilisation,
    published_peak_tflops,
)

IMAGE_SIZE = 56


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA H200 NVL", 835.0),
        ("NVIDIA GH200 480GB", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100-PCIE-40GB", 312.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA L40S", None),  # another GPU, not an L4
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_published_peaks_are_found_by_the_device_name(name: str, peak: float | None) -> None:
    assert published_peak_tflops(name) == peak


def test_utilisation_is_model_flops_per_second_over_the_peak() -> None:
    # 1.2 TFLOP per image at 100 images/s on a 989 TFLOP/s GPU.
    assert model_flops_utilisation(1.2e12, 100.0, 989.0) == pytest.approx(120 / 989)


def test_batches_cycle_through_the_images_in_order() -> None:
    images = [torch.full((1, 1, 2, 2), float(index)) for index in range(3)]
    for batch_size, expected in [(1, [[0], [1], [2]]), (2, [[0, 1], [2, 0]]), (8, [[0, 1, 2, 0, 1, 2, 0, 1]])]:
        batches = cyclic_batches(images, batch_size, min_images=3)
        assert [batch[:, 0, 0, 0].int().tolist() for batch in batches] == expected


def test_fused_attention_on_the_cpu_is_counted() -> None:
    query, key, value = (torch.rand(2, 4, 10, 16) for _ in range(3))
    # Two matrix products of (10 x 16) by (16 x 10) and (10 x 10) by (10 x 16) per batch item and head.
    assert count_flops(lambda _: F.scaled_dot_product_attention(query, key, value), query) == 2 * 4 * 2 * (
        2 * 10 * 10 * 16
    )


def test_model_flops_per_image(tiny_clip_path: Path, tiny_prompt_path: Path, tiny_clip_config: TinyClipConfig) -> None:
    model = AnomalyCLIP(
        pretrained=str(tiny_clip_path), prompt_weights=str(tiny_prompt_path), image_size=IMAGE_SIZE, visualizer=False
    ).eval()
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(images)  # computes and caches the text features, work a count should not include
    one, two = count_flops(model, images[:1]), count_flops(model, images)
    assert two == 2 * one
    # The vision transformer's matrix products: 4 d^2 (attention projections) + 8 d^2 (MLP) MACs per token and block,
    # and the patch embedding; DPAM's extra attention paths and the map smoothing add a little.
    width, blocks, patch = tiny_clip_config.vision_width, tiny_clip_config.vision_layers, 14
    tokens = (IMAGE_SIZE // patch) ** 2 + 1
    transformer = 2 * blocks * tokens * 12 * width**2 + 2 * (tokens - 1) * 3 * patch**2 * width
    assert transformer < one < 1.3 * transformer
    plain = FlopCounterMode(display=False)
    with plain, torch.inference_mode():
        model(images[:1])
    assert plain.get_total_flops() < one  # attention, which torch's own counter leaves out on the CPU

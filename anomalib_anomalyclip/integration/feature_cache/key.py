"""What the cached features depend on: the key of a cache and the hash of the encoder's weights.

The directory name of a memory-mapped cache is a digest of everything that changes the
features: a hash of the visual encoder's weights, the input size, the DPAM kind and start
layer, the feature layers, the pre-processing and dataset transforms (their ``repr``), the
trainer's precision, the device type, the torch version, the storage layout and the list
of training images. The index repeats the full key and is compared on opening (see
:mod:`.index`), so a stale or foreign cache is never read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["FORMAT_VERSION", "cache_key", "input_key", "weights_digest"]

FORMAT_VERSION = 1


def weights_digest(module: torch.nn.Module) -> str:
    """BLAKE2 hash of a module's parameters and buffers (names, dtypes, shapes and bytes).

    About 2 s for ViT-L/14's 300 M visual parameters on one CPU core.
    """
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def cache_key(
    encoder: torch.nn.Module,
    image_size: Sequence[int],
    transforms: Sequence[object] = (),
    precision: str = "32-true",
    device_type: str = "cpu",
) -> dict[str, Any]:
    """Everything that changes the visual features of an image path, as plain JSON data.

    Args:
        encoder: the :class:`~anomalib_anomalyclip.method.dpam.DualPathVisualEncoder`.
        image_size: (height, width) of the encoder's input.
        transforms: every transform between the image file and the encoder (dataset
            transforms and the pre-processor's); compared by their ``repr``.
        precision: the trainer's precision (autocast changes the features).
        device_type: where the features are computed (kernels round differently).
    """
    return {
        "format": FORMAT_VERSION,
        "visual_weights": weights_digest(encoder),
        **input_key(image_size, transforms),
        "dpam_kind": encoder.dpam_kind.value,
        "dpam_start_layer": encoder.dpam_start_layer,
        "feature_layers": list(encoder.feature_layers),
        "precision": str(precision),
        "device": device_type,
        "torch": torch.__version__,
    }


def input_key(image_size: Sequence[int], transforms: Sequence[object] = ()) -> dict[str, Any]:
    """The part of :func:`cache_key` that other data sharing the cache is checked against (size, pre-processing)."""
    return {
        "image_size": [int(side) for side in image_size],
        "pre_processing": [repr(transform) for transform in transforms],
    }

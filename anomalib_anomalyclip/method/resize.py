"""The reference implementation's 8-bit PIL resize, in torch: images bicubic, masks bilinear > 0.5.

The reference (zqhang/AnomalyCLIP) resizes each 8-bit image with PIL: bicubic with PIL's antialiasing (support
widened by the down-scaling factor, kernel ``a = -0.5``), two separable passes (horizontal first), each rounded and
clipped to 0..255; masks binarised to 0/255, bilinear, then ``> 0.5``. :func:`resize_image_like_pil` gives the same
levels: on CPU with torch's 8-bit antialiased kernel, elsewhere and in exported graphs with that kernel's arithmetic
(its 16-bit weights and rounding) as two matrix products (:func:`resampling_matrix`), which ONNX and OpenVINO run as
they are. :func:`resize_mask_like_pil` calls PIL itself. :mod:`anomalib_anomalyclip.integration.pre_processor` wraps
both as a torchvision transform for anomalib; :mod:`.tiling` resizes the global view with :func:`resampling_matrix`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image as PILImage

CUBIC_A = -0.5  # PIL's (and torch's antialiased) bicubic kernel parameter
CUBIC_SUPPORT = 2.0
MAX_LEVEL = 255.0
MASK_THRESHOLD = 128  # 8-bit mask level above 0.5 after ``ToTensor`` (127 / 255 < 0.5 < 128 / 255)
INT16_LIMIT = 32767.5  # a weight times 2 ** (precision + 1) must round below 2 ** 15
MAX_PRECISION = 22.0


def _cubic(distance: torch.Tensor) -> torch.Tensor:
    """PIL's bicubic kernel (``a = -0.5``), zero from distance 2 on."""
    x = distance.abs()
    near = ((CUBIC_A + 2) * x - (CUBIC_A + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * CUBIC_A
    return torch.where(x < 1, near, torch.where(x < CUBIC_SUPPORT, far, torch.zeros_like(x)))


def resampling_matrix(in_size: int, out_size: int, like: torch.Tensor) -> torch.Tensor:
    """(out_size, in_size) weights of PIL's antialiased bicubic resampling along one axis.

    Output sample ``i`` is centred at ``(i + 0.5) * scale`` in input coordinates; the kernel is stretched by
    ``max(scale, 1)`` (antialiasing when down-scaling) and each row is normalised to sum to one, as PIL does.
    Written with tensor operations only, so an exported graph computes it for any input size.

    Args:
        in_size: input length.
        out_size: output length.
        like: a tensor whose dtype and device the weights take.
    """
    source = torch.arange(in_size, dtype=like.dtype, device=like.device)
    target = torch.arange(out_size, dtype=like.dtype, device=like.device)
    length = source.new_full((), 1.0) * in_size
    # (source + 0.5 - centre) / stretch with an integer numerator and denominator: one rounding only, so that
    # float32 (as OpenVINO runs the graph) stays close to float64.
    numerator = (2 * source[None, :] + 1) * out_size - (2 * target[:, None] + 1) * length
    weights = _cubic(numerator / (2 * torch.clamp(length, min=out_size)))
    return weights / weights.sum(dim=1, keepdim=True)


def _fixed_point(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights as the 16-bit integers of torch's 8-bit kernel, and their unit ``2 ** precision``.

    The precision is the largest that keeps the biggest weight below ``2 ** 15`` (at most 22 bits); weights are
    rounded half away from zero.
    """
    precision = torch.clamp(torch.ceil(torch.log2(INT16_LIMIT / weights.max())) - 1, max=MAX_PRECISION)
    unit = torch.pow(2.0, precision)
    return torch.trunc(weights * unit + torch.sign(weights) * 0.5), unit


def _rounded(sums: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """Integer sums back to grey levels: add half a unit, shift right (floor), clip to 0..255."""
    return torch.floor((sums + unit / 2) / unit).clamp(0.0, MAX_LEVEL)


def _resize_levels_matmul(levels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The 8-bit kernel's arithmetic as two matrix products (horizontal, then vertical), on grey levels 0..255.

    The weights are computed in float64 and rounded to their 16-bit values; the integer-valued float32 sums are
    exact while they stay below ``2 ** 24``, so the result equals the kernel's up to inputs of about 2000 px
    (0 differing values on noise at 1024, 1500 and 2000 px); larger ones have a few values one level off
    (7 of 805 k at 3000 px, 18 at 4000 px).
    """
    height, width = levels.shape[-2:]
    exact = levels.new_zeros((), dtype=torch.float64)  # float32 weights would flip some 16-bit values
    horizontal, unit = _fixed_point(resampling_matrix(width, size[1], exact))
    rows = _rounded(torch.matmul(levels, horizontal.to(levels.dtype).T), unit.to(levels.dtype))
    vertical, unit = _fixed_point(resampling_matrix(height, size[0], exact))
    return _rounded(torch.matmul(vertical.to(levels.dtype), rows), unit.to(levels.dtype))


def _resize_levels_uint8(levels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Torch's 8-bit antialiased bicubic kernel (CPU; fastest on channels-last data), on grey levels 0..255."""
    flat = levels.reshape(-1, *levels.shape[-3:])
    as_bytes = torch.empty(flat.shape, dtype=torch.uint8, memory_format=torch.channels_last).copy_(flat)
    resized = torch.nn.functional.interpolate(as_bytes, size=tuple(size), mode="bicubic", antialias=True)
    resized = resized.to(levels.dtype, memory_format=torch.contiguous_format)
    return resized.reshape(*levels.shape[:-2], *size)


def resize_image_like_pil(image: torch.Tensor, size: Sequence[int], exportable: bool = False) -> torch.Tensor:
    """Resize float images in [0, 1] (..., C, H, W) as PIL resizes 8-bit images (bicubic, antialiased).

    The values are taken to 8-bit levels first (exact for images read from 8-bit files); the result holds
    multiples of 1/255. Images already of ``size`` are returned as they are (PIL copies them), except in the
    exportable form, whose graph resizes whatever it gets (the resize of an 8-bit image to its own size is the
    identity).

    Args:
        image: images in [0, 1].
        size: (height, width).
        exportable: the graph form (float32 matrix products) on any device; else the CPU kernel on CPU and
            float64 matrix products elsewhere.
    """
    if not exportable and tuple(image.shape[-2:]) == tuple(size):
        return image
    if not exportable and image.device.type == "cpu" and image.ndim >= 3:
        levels = image.mul(MAX_LEVEL).round_().clamp_(0.0, MAX_LEVEL)
        return _resize_levels_uint8(levels, size).div_(MAX_LEVEL)
    levels = (image * MAX_LEVEL).round().clamp(0.0, MAX_LEVEL)
    if not exportable:  # another device: float64 keeps the sums exact even where float32 products use TF32
        return (_resize_levels_matmul(levels.double(), size) / MAX_LEVEL).to(image.dtype)
    return _resize_levels_matmul(levels, size) / MAX_LEVEL


# --------------------------------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------------------------------


def _resize_one_mask(mask: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """One (H, W) mask: 0/255, PIL bilinear (antialiased), then above 0.5."""
    image = PILImage.fromarray(np.where(mask > 0, 255, 0).astype(np.uint8), mode="L")
    resized = image.resize((int(size[1]), int(size[0])), PILImage.Resampling.BILINEAR)
    return np.asarray(resized) >= MASK_THRESHOLD


def resize_mask_like_pil(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize masks (..., H, W) as the reference does: bilinear with antialiasing, then ``> 0.5``.

    Non-zero pixels count as anomalous; the result has the input's dtype, device and leading dimensions.

    Args:
        mask: masks (any dtype).
        size: (height, width).
    """
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    planes = mask.detach().reshape(-1, *mask.shape[-2:]).cpu().numpy()
    resized = np.stack([_resize_one_mask(plane, size) for plane in planes])
    out = torch.from_numpy(resized).reshape(*mask.shape[:-2], *size)
    return out.to(device=mask.device, dtype=mask.dtype)


# --------------------------------------------------------------------------------------------------------------------
# Transforms and pre-processor
# --------------------------------------------------------------------------------------------------------------------

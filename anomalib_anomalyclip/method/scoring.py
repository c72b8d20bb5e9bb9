"""From visual and text features to AnomalyCLIP's image score and anomaly map.

* image score: ``softmax(cos(global, [t_normal, t_abnormal]) / 0.07)[abnormal]``;
* per feature layer: the same two-way softmax per patch, up-sampled bilinearly to the
  image size; a layer's map is ``(P_abnormal + 1 - P_normal) / 2``;
* the anomaly map is the sum of the layer maps, smoothed with a Gaussian (sigma 4,
  scipy's defaults: truncate 4, ``reflect`` border that repeats the edge sample).
  Values therefore lie in [0, number of feature layers].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

TEMPERATURE = 0.07


def two_way_probabilities(features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Softmax over (normal, abnormal) of the cosine similarities divided by the temperature.

    Args:
        features: (B, ..., D) visual features, not necessarily normalised.
        text_features: (B or 1, 2, D) normalised text features.

    Returns:
        (B, ..., 2) probabilities.
    """
    return similarity_logits(features, text_features).softmax(dim=-1)


def similarity_logits(features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Cosine similarities with the normal and abnormal text features, divided by 0.07."""
    features = F.normalize(features, dim=-1)
    batch = features.shape[0]
    flat = features.reshape(batch, -1, features.shape[-1])
    logits = flat @ text_features.transpose(-1, -2) / TEMPERATURE
    return logits.reshape(*features.shape[:-1], 2)


def patch_probability_maps(
    patch_tokens: torch.Tensor, text_features: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """Per-patch (normal, abnormal) probabilities up-sampled to the image size.

    Args:
        patch_tokens: (B, rows * columns, D) patch tokens of one layer.
        text_features: (B or 1, 2, D) normalised text features.
        grid: (rows, columns) of the patch grid.
        size: output (height, width).

    Returns:
        (B, 2, height, width) probabilities; channel 0 normal, 1 abnormal.
    """
    probabilities = two_way_probabilities(patch_tokens, text_features)
    probabilities = probabilities.transpose(1, 2).reshape(patch_tokens.shape[0], 2, *grid)
    return F.interpolate(probabilities, size=size, mode="bilinear", align_corners=False)


def layer_anomaly_map(probabilities: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) probabilities to the (B, 1, H, W) map ``(P_abnormal + 1 - P_normal) / 2``."""
    return ((probabilities[:, 1] + 1 - probabilities[:, 0]) / 2).unsqueeze(1)


def summed_anomaly_map(
    patch_tokens: Sequence[torch.Tensor], text_features: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """Sum over layers of the layer maps, (B, 1, H, W), before smoothing.

    Up-sampling is linear, so the layers are summed on the patch grid and up-sampled
    once; this equals up-sampling each layer first.
    """
    summed = sum(
        layer_anomaly_map(patch_probability_maps(tokens, text_features, grid, grid)) for tokens in patch_tokens
    )
    return F.interpolate(summed, size=size, mode="bilinear", align_corners=False)


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """scipy.ndimage's 1-D Gaussian weights: radius ``int(truncate * sigma + 0.5)``, sum 1."""
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (weights / weights.sum()).float()


def symmetric_indices(length: int, radius: int) -> torch.Tensor:
    """Source index of each position of a signal padded by ``radius`` with scipy's ``reflect`` border.

    ``reflect`` mirrors about the edge and repeats the edge sample (d c b a | a b c d |
    d c b a), and keeps mirroring when ``radius`` exceeds ``length``.
    """
    positions = torch.arange(-radius, length + radius)
    folded = positions % (2 * length)
    return torch.where(folded >= length, 2 * length - 1 - folded, folded)


class GaussianSmoothing(nn.Module):
    """Separable Gaussian blur of (B, 1, H, W) maps, equal to ``scipy.ndimage.gaussian_filter``.

    Args:
        sigma: standard deviation in pixels; 0 turns smoothing off.
        truncate: kernel radius in standard deviations, as in scipy.
    """

    def __init__(self, sigma: float = 4.0, truncate: float = 4.0) -> None:
        super().__init__()
        self.sigma = sigma
        kernel = gaussian_kernel(sigma, truncate) if sigma > 0 else torch.ones(1)
        self.radius = kernel.numel() // 2
        self.register_buffer("kernel", kernel, persistent=False)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """Smooth ``maps`` (B, 1, H, W)."""
        if self.sigma <= 0:
            return maps
        height, width = maps.shape[-2:]
        kernel = self.kernel.to(maps.dtype)
        rows = symmetric_indices(height, self.radius).to(maps.device)
        columns = symmetric_indices(width, self.radius).to(maps.device)
        padded = maps.index_select(-2, rows)
        smoothed = F.conv2d(padded, kernel.view(1, 1, -1, 1))
        padded = smoothed.index_select(-1, columns)
        return F.conv2d(padded, kernel.view(1, 1, 1, -1))


def image_scores(global_embedding: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Abnormal probability (B,) of each image from its global embedding (B, D)."""
    return two_way_probabilities(global_embedding.unsqueeze(1), text_features)[:, 0, 1]

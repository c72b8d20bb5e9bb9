"""Scores, maps and the Gaussian smoothing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from anomalib_anomalyclip.method.scoring import (
    TEMPERATURE,
    GaussianSmoothing,
    image_scores,
    layer_anomaly_map,
    patch_probability_maps,
    summed_anomaly_map,
    symmetric_indices,
)


def test_symmetric_indices_repeat_the_edge_sample() -> None:
    # scipy's "reflect": d c b a | a b c d | d c b a
    assert symmetric_indices(4, 3).tolist() == [2, 1, 0, 0, 1, 2, 3, 3, 2, 1]


def test_symmetric_indices_keep_folding_past_the_signal() -> None:
    assert symmetric_indices(2, 5).tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1]


@pytest.mark.parametrize(("height", "width"), [(64, 64), (37, 50), (9, 5)])
@pytest.mark.parametrize("sigma", [4.0, 1.5])
def test_smoothing_equals_scipy_gaussian_filter(height: int, width: int, sigma: float) -> None:
    maps = torch.rand(2, 1, height, width, generator=torch.Generator().manual_seed(height))
    expected = np.stack([gaussian_filter(image[0].double().numpy(), sigma=sigma) for image in maps])
    smoothed = GaussianSmoothing(sigma)(maps)
    assert smoothed.shape == maps.shape
    np.testing.assert_allclose(smoothed[:, 0].numpy(), expected, atol=1e-6)


def test_smoothing_with_sigma_zero_is_identity() -> None:
    maps = torch.rand(1, 1, 8, 8)
    assert torch.equal(GaussianSmoothing(0)(maps), maps)


def test_image_score_is_the_softmax_of_cosines_over_temperature() -> None:
    text = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # normal along x, abnormal along y
    global_embedding = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, 0.5]])
    expected_abnormal = 1 / (1 + math.exp(-1 / TEMPERATURE))
    scores = image_scores(global_embedding, text)
    torch.testing.assert_close(scores, torch.tensor([1 - expected_abnormal, 0.5, expected_abnormal]))


def test_layer_map_is_half_of_abnormal_plus_one_minus_normal() -> None:
    probabilities = torch.tensor([0.3, 0.7]).view(1, 2, 1, 1).expand(1, 2, 2, 2)
    torch.testing.assert_close(layer_anomaly_map(probabilities), torch.full((1, 1, 2, 2), 0.7))


def test_patch_maps_are_upsampled_bilinearly_per_grid_cell() -> None:
    generator = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(1, 2, 8, generator=generator), dim=-1)
    tokens = torch.randn(2, 6, 8, generator=generator)
    maps = patch_probability_maps(tokens, text, grid=(2, 3), size=(4, 6))
    assert maps.shape == (2, 2, 4, 6)
    torch.testing.assert_close(maps.sum(dim=1), torch.ones(2, 4, 6))
    on_grid = patch_probability_maps(tokens, text, grid=(2, 3), size=(2, 3))
    # token index = row * columns + column
    cosine = F.normalize(tokens[1, 4], dim=-1) @ text[0].T / TEMPERATURE
    torch.testing.assert_close(on_grid[1, :, 1, 1], cosine.softmax(-1))


def test_summed_map_equals_sum_of_upsampled_layer_maps() -> None:
    generator = torch.Generator().manual_seed(1)
    text = F.normalize(torch.randn(1, 2, 8, generator=generator), dim=-1)
    layers = [torch.randn(2, 9, 8, generator=generator) for _ in range(4)]
    expected = sum(layer_anomaly_map(patch_probability_maps(tokens, text, (3, 3), (14, 14))) for tokens in layers)
    summed = summed_anomaly_map(layers, text, (3, 3), (14, 14))
    torch.testing.assert_close(summed, expected)
    assert summed.min() >= 0 and summed.max() <= 4

"""Mutual scoring (MuSc): the module against a naive transcription of LNAMD, MSM and RsCIN."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from anomalib_anomalyclip.method.mutual import (
    MutualScoring,
    lnamd,
    minimum_pool,
    mutual_patch_scores,
    score_pool,
    split_pool,
)

GRID = (5, 5)
IMAGE_SIZE = (21, 17)
CHANNELS = 16


def naive_lnamd(tokens: torch.Tensor, grid: tuple[int, int], radius: int) -> torch.Tensor:
    """Per image: LayerNorm over all values, zero-padded r x r neighbourhood sums / r^2, unit length."""
    height, width = grid
    features = torch.zeros(tokens.shape, dtype=torch.float64)
    for image, values in enumerate(tokens.double()):
        mean = values.mean()
        variance = ((values - mean) ** 2).mean()
        normed = ((values - mean) / torch.sqrt(variance + 1e-5)).reshape(height, width, -1)
        half = radius // 2
        for row in range(height):
            for column in range(width):
                total = torch.zeros(values.shape[-1], dtype=torch.float64)
                for d_row in range(-half, half + 1):
                    for d_column in range(-half, half + 1):
                        if 0 <= row + d_row < height and 0 <= column + d_column < width:
                            total += normed[row + d_row, column + d_column]
                aggregated = total / radius**2
                features[image, row * width + column] = aggregated / aggregated.norm()
    return features


def naive_msm(features: torch.Tensor, fraction: float) -> torch.Tensor:
    """Per image i and patch p: mean of the k smallest nearest-token distances to the other images."""
    count = features.shape[0]
    kept = int((count - 1) * fraction)
    scores = []
    for image in range(count):
        nearest = [
            torch.cdist(features[image], features[other], compute_mode="donot_use_mm_for_euclid_dist").amin(dim=1)
            for other in range(count)
            if other != image
        ]
        scores.append(torch.stack(nearest, dim=1).sort(dim=1).values[:, :kept].mean(dim=1))
    return torch.stack(scores)


def naive_rscin(scores: torch.Tensor, embeddings: torch.Tensor, ks: tuple[int, ...]) -> torch.Tensor:
    scores = scores.double()
    normalised = (scores - scores.min()) / (scores.max() - scores.min())
    unit = embeddings.double() / embeddings.double().norm(dim=1, keepdim=True)
    similarity = unit @ unit.T
    results = []
    for k in ks:
        weights = torch.zeros_like(similarity)
        for row in range(len(scores)):
            kept = similarity[row].argsort(descending=True)[:k]
            weights[row, kept] = similarity[row, kept] / similarity[row, kept].sum()
        results.append(weights @ normalised)
    return torch.stack(results).mean(dim=0)


def naive_maps(tokens_per_block: list[torch.Tensor], config: MutualScoring) -> torch.Tensor:
    patch = torch.stack(
        [
            naive_msm(naive_lnamd(tokens, GRID, radius), config.fraction)
            for tokens in tokens_per_block
            for radius in config.radii
        ]
    ).mean(dim=0)
    return F.interpolate(patch.reshape(-1, 1, *GRID), size=IMAGE_SIZE, mode="bilinear", align_corners=True)


def naive_pool(
    tokens_per_block: list[torch.Tensor], config: MutualScoring, embeddings: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    count = tokens_per_block[0].shape[0]
    maps = torch.zeros(count, 1, *IMAGE_SIZE, dtype=torch.float64)
    for subset in split_pool(count, config.pool_size, config.seed, config.min_pool):
        maps[subset] = naive_maps([tokens[subset] for tokens in tokens_per_block], config)
    scores = maps.flatten(1).amax(dim=1)
    if embeddings is not None:
        scores = naive_rscin(scores, embeddings, config.rscin_k)
    return scores, maps


def random_tokens(count: int, blocks: int = 2, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    length = GRID[0] * GRID[1]
    return [torch.randn(count, length, CHANNELS, generator=generator) * 3 + 1 for _ in range(blocks)]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-5) -> None:
    difference = (actual.double() - expected.double()).abs().max().item()
    assert difference <= tolerance, f"max difference {difference:.2e} > {tolerance:.0e}"


@pytest.mark.parametrize("count", [7, 5])
def test_pool_matches_the_naive_definition(count: int) -> None:
    config = MutualScoring(blocks=(6, 12), rscin_k=None)
    tokens = random_tokens(count)
    scores, maps = score_pool(tokens, GRID, IMAGE_SIZE, config)
    expected_scores, expected_maps = naive_pool(tokens, config)
    assert maps.shape == (count, 1, *IMAGE_SIZE) and maps.dtype == torch.float32
    assert_close(maps, expected_maps)
    assert_close(scores, expected_scores)


def test_lnamd_matches_the_naive_definition_for_each_radius() -> None:
    tokens = random_tokens(3, blocks=1)[0]
    for radius in (1, 3, 5):
        assert_close(lnamd(tokens, GRID, radius), naive_lnamd(tokens, GRID, radius))


def test_subsets_are_each_scored_like_a_pool_of_their_own_and_rscin_runs_over_all() -> None:
    config = MutualScoring(blocks=(6, 12), radii=(1, 3), pool_size=6, rscin_k=(1, 2, 3), seed=3)
    tokens = random_tokens(13, seed=1)
    embeddings = torch.randn(13, 8, generator=torch.Generator().manual_seed(2))
    assert len(split_pool(13, 6, 3, 5)) == 2  # 13 > 6 images: two subsets of 7 and 6
    scores, maps = score_pool(tokens, GRID, IMAGE_SIZE, config, class_embeddings=embeddings)
    expected_scores, expected_maps = naive_pool(tokens, config, embeddings)
    assert_close(maps, expected_maps)
    assert_close(scores, expected_scores)


def test_rscin_with_k_one_keeps_the_normalised_scores() -> None:
    config = MutualScoring(blocks=(6,), radii=(1,), rscin_k=(1,))
    tokens = random_tokens(6, blocks=1)
    raw, _ = score_pool(tokens, GRID, IMAGE_SIZE, MutualScoring(blocks=(6,), radii=(1,), rscin_k=None))
    rescored, _ = score_pool(tokens, GRID, IMAGE_SIZE, config, class_embeddings=torch.randn(6, 4))
    assert_close(rescored, (raw - raw.min()) / (raw.max() - raw.min()))


def test_float16_tokens_are_scored_in_float32() -> None:
    config = MutualScoring(blocks=(6, 12), rscin_k=None)
    tokens = random_tokens(6)
    stored = [block.half() for block in tokens]
    scores, maps = score_pool(stored, GRID, IMAGE_SIZE, config)
    upcast_scores, upcast_maps = naive_pool([block.float() for block in stored], config)
    _, float32_maps = score_pool(tokens, GRID, IMAGE_SIZE, config)
    assert maps.dtype == torch.float32
    assert_close(maps, upcast_maps)  # exact on the values float16 holds
    assert_close(scores, upcast_scores)
    assert_close(maps, float32_maps, tolerance=1e-3)  # float16 storage rounds each value by up to ~5e-4 (relative)


def test_result_does_not_depend_on_the_chunk_size() -> None:
    config = MutualScoring(blocks=(6, 12), rscin_k=None)
    tokens = random_tokens(9, seed=4)
    _, one_image_per_product = score_pool(tokens, GRID, IMAGE_SIZE, config, chunk_tokens=1)
    _, all_images_per_product = score_pool(tokens, GRID, IMAGE_SIZE, config, chunk_tokens=10_000)
    assert_close(one_image_per_product, all_images_per_product, tolerance=1e-6)


def test_a_planted_outlier_patch_is_the_pool_maximum() -> None:
    generator = torch.Generator().manual_seed(5)
    grid, length, count = (6, 6), 36, 8
    base = torch.randn(length, CHANNELS, generator=generator)
    tokens = base + 0.1 * torch.randn(count, length, CHANNELS, generator=generator)
    image, row, column = 3, 2, 4
    tokens[image, row * 6 + column] = 4 * torch.randn(CHANNELS, generator=generator)
    config = MutualScoring(blocks=(6,), rscin_k=None)
    _, maps = score_pool([tokens], grid, (51, 51), config)  # grid point (r, c) falls on pixel (10 r, 10 c)
    assert maps[image, 0, 10 * row, 10 * column] == maps.max()
    assert (maps[image] == maps.max()).sum() == 1


def test_split_is_a_reproducible_balanced_partition() -> None:
    subsets = split_pool(23, pool_size=10, seed=0, minimum=5)
    assert sorted(len(subset) for subset in subsets) == [7, 8, 8]
    assert torch.equal(torch.cat(subsets).sort().values, torch.arange(23))
    assert all(torch.equal(a, b) for a, b in zip(subsets, split_pool(23, 10, 0, 5), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(subsets, split_pool(23, 10, 1, 5), strict=True))
    assert [len(subset) for subset in split_pool(11, pool_size=5, seed=0, minimum=5)] == [6, 5]  # not 4 + 4 + 3
    assert [len(subset) for subset in split_pool(10, pool_size=10, seed=0, minimum=5)] == [10]


def test_minimum_pool_follows_the_fraction() -> None:
    assert MutualScoring().min_pool == 5
    assert minimum_pool(1.0) == 2 and minimum_pool(0.5) == 3 and minimum_pool(0.1) == 11
    for fraction in (0.3, 0.25, 0.2, 0.7, 0.05):
        smallest = minimum_pool(fraction)
        assert int((smallest - 1) * fraction) >= 1 and int((smallest - 2) * fraction) == 0


def test_a_pool_below_the_minimum_is_refused_with_its_size() -> None:
    config = MutualScoring(blocks=(6,))
    with pytest.raises(ValueError, match=r"at least 5 images at fraction=0.3.*pool of 4"):
        score_pool(random_tokens(4, blocks=1), GRID, IMAGE_SIZE, config)
    with pytest.raises(ValueError, match=r"at least 5 images.*pool of 4"):
        mutual_patch_scores(random_tokens(4, blocks=1), GRID, config)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"fraction": 0.0}, r"fraction must lie in \(0, 1\], got 0.0"),
        ({"fraction": 1.5}, r"fraction must lie in \(0, 1\], got 1.5"),
        ({"radii": (1, 2)}, r"odd positive integers.*got 2"),
        ({"radii": (0,)}, r"odd positive integers.*got 0"),
        ({"radii": ()}, r"at least one LNAMD radius"),
        ({"blocks": ()}, r"at least one visual block"),
        ({"pool_size": 4}, r"pool_size=4 is below.*5 images"),
        ({"rscin_k": (0, 1)}, r"RsCIN neighbourhood sizes must be positive"),
    ],
)
def test_bad_settings_are_refused_with_a_clear_message(arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MutualScoring(**arguments)


def test_tokens_that_do_not_fit_the_settings_are_refused() -> None:
    config = MutualScoring(blocks=(6, 12))
    with pytest.raises(ValueError, match=r"1 block\(s\) for the 2 configured blocks"):
        score_pool(random_tokens(6, blocks=1), GRID, IMAGE_SIZE, config)
    with pytest.raises(ValueError, match=r"4 x 4 token grid holds 16 tokens, got 25"):
        score_pool(random_tokens(6), (4, 4), IMAGE_SIZE, config)
    with pytest.raises(ValueError, match=r"odd positive integers.*got 2"):
        lnamd(random_tokens(6, blocks=1)[0], GRID, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tokens_score_like_cpu_tokens() -> None:
    config = MutualScoring(blocks=(6, 12), rscin_k=(1, 2))
    tokens, embeddings = random_tokens(7), torch.randn(7, 8)
    scores, maps = score_pool(tokens, GRID, IMAGE_SIZE, config, class_embeddings=embeddings)
    cuda_scores, cuda_maps = score_pool(
        [block.cuda() for block in tokens], GRID, IMAGE_SIZE, config, class_embeddings=embeddings.cuda()
    )
    assert cuda_maps.is_cuda and cuda_scores.is_cuda
    assert_close(cuda_maps.cpu(), maps, tolerance=1e-4)
    assert_close(cuda_scores.cpu(), scores, tolerance=1e-4)

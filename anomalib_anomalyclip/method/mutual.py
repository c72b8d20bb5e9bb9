r"""Mutual scoring (MuSc, Li et al., ICLR 2024): a pool of unlabelled images scored against each other.

No prompt, no reference: most patches of most images in a pool of the same product are normal, so a
patch that has no close match in the other images is anomalous. For visual block ``b`` the pool's
``N`` images give patch tokens ``x_{b,i}`` of shape (L, C) on an ``H x W`` grid (``L = H W``).

LNAMD (local neighbourhood aggregation), per block, image and radius ``r`` (odd):

.. code-block:: text

    y_i       = (x_i - mean(x_i)) / sqrt(var(x_i) + 1e-5)       one LayerNorm over all C x H x W values
    z_{i,p}   = sum_{q in r x r square around p} y_{i,q} / r^2   zero padding at the border
    t_{i,p}   = z_{i,p} / ||z_{i,p}||_2

(The LayerNorm's per-image scale, its ``eps`` and the ``1 / r^2`` cancel in the last step; only the
mean subtraction and the neighbourhood sums change ``t``.)

MSM (mutual scoring), per block and radius, with ``k = int((N - 1) * fraction)``:

.. code-block:: text

    a_i(p, j) = min_q ||t_{i,p} - t_{j,q}||_2                    nearest token of image j != i
    m_i(p)    = mean of the k smallest a_i(p, j) over j != i
    M_i       = mean over blocks and radii of m_i                 (H, W) patch scores

Maps and image scores: ``A_i = bilinear(M_i)`` to the image size (``align_corners=True``) and
``s_i = max A_i``. RsCIN (re-scoring with constrained image-level neighbourhood), with the images'
L2-normalised class embeddings ``c_i`` and a list of ``k``:

.. code-block:: text

    s'        = (s - min s) / (max s - min s)
    W         = c c^T,  W_k = W with each row's k largest entries kept (self included), the rest 0
    P_k       = W_k with rows scaled to sum 1
    final     = mean_k P_k s'

A pool of more than ``pool_size`` images is split into subsets (a seeded permutation, then balanced
consecutive chunks), each scored on its own; RsCIN then runs over the whole pool, as in MuSc.
``k >= 1`` needs ``N >= min_pool`` images in every subset (5 at ``fraction = 0.3``).

With the prompts (:func:`fuse_with_prompts`), each of the two scores and maps is min-max scaled over the pool
and the two are averaged (``mean``), or the mutual ones are kept alone (``mutual``).

Cost, per block and radius: ``N (N - 1) / 2`` products of two (L, C) token sets (each pair's
squared-distance matrix serves both directions), run as chunked matrix products
``||x||^2 + ||y||^2 - 2 x.y`` in float32; the table of nearest distances is (N, N, L).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from anomalib_anomalyclip.errors import AnomalyCLIPError

RSCIN_CHUNK_ROWS = 1024  # rows of RsCIN's similarity matrix at once
CHUNK_TOKENS = 8192  # reference tokens per matrix product (whole images, at least one): bounds L x CHUNK_TOKENS
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, as in MuSc
MutualFusion = Literal["mean", "mutual"]


class MutualScoringError(AnomalyCLIPError, ValueError):
    """Mutual scoring cannot run with these settings, or on a pool this small (messages name the model's arguments)."""


def neighbours_kept(pool: int, fraction: float) -> int:
    """Number ``int((pool - 1) * fraction)`` of nearest other images whose distances are averaged."""
    return int((pool - 1) * fraction)


def minimum_pool(fraction: float) -> int:
    """Smallest pool for which at least one other image is kept at ``fraction``."""
    others = max(1, math.ceil(1 / fraction))
    while neighbours_kept(others + 1, fraction) < 1:  # float rounding of 1 / fraction
        others += 1
    while others > 1 and neighbours_kept(others, fraction) >= 1:
        others -= 1
    return others + 1


def check_pool(pool: int, fraction: float) -> None:
    """Raise :class:`MutualScoringError` when a pool of ``pool`` images is too small for ``fraction``."""
    minimum = minimum_pool(fraction)
    if pool < minimum:
        raise MutualScoringError(
            f"Mutual scoring needs a pool of at least {minimum} images at fraction={fraction} "
            f"(int((N - 1) * fraction) must be at least 1), got a pool of {pool}."
        )


def check_radii(radii: Sequence[int]) -> None:
    """Raise :class:`MutualScoringError` unless ``radii`` is a non-empty sequence of odd positive integers."""
    if len(radii) == 0:
        raise MutualScoringError("Mutual scoring needs at least one LNAMD radius (mutual.radii), got none.")
    for radius in radii:
        if isinstance(radius, bool) or not isinstance(radius, int) or radius < 1 or radius % 2 == 0:
            raise MutualScoringError(
                f"LNAMD radii (mutual.radii) must be odd positive integers (1, 3, 5, ...), got {radius!r}."
            )


@dataclass(frozen=True)
class MutualScoring:
    """Mutual scoring of each image against the other images of its pool (MuSc), and its fusion with the prompts.

    The pools are the images of a validation, test or predict run, per category or folder (see
    :mod:`anomalib_anomalyclip.integration.pool_scoring`). Bad settings raise :class:`MutualScoringError`, whose
    messages name the model's arguments (``mutual.fraction``, ...).

    Args:
        enabled: score mutually (``--model.mutual true`` for short).
        blocks: visual blocks whose raw patch tokens are compared (one token tensor per block).
        radii: LNAMD neighbourhood sizes (odd).
        fraction: share of the other images whose nearest-patch distances are averaged, in (0, 1].
        pool_size: largest subset of a pool scored at once (larger pools are split reproducibly).
        rscin_k: RsCIN neighbourhood sizes for the image scores (MuSc: 1, 2, 3 for MVTec AD; 1, 8, 9 for VisA);
            ``None``: the maps' maxima.
        fusion: ``mean`` (prompts and mutual scores, each on the pool's [0, 1] scale, averaged) or ``mutual`` (the
            mutual score and map alone).
        seed: seed of the split of large pools into subsets.
    """

    enabled: bool = False
    blocks: tuple[int, ...] = (6, 12, 18, 24)
    radii: tuple[int, ...] = (1, 3, 5)
    fraction: float = 0.3
    pool_size: int = 200
    rscin_k: tuple[int, ...] | None = (1, 2, 3)
    fusion: MutualFusion = "mean"
    seed: int = 111

    def __post_init__(self) -> None:
        object.__setattr__(self, "rscin_k", tuple(self.rscin_k) if self.rscin_k else None)  # lists from the CLI
        object.__setattr__(self, "blocks", tuple(self.blocks))
        object.__setattr__(self, "radii", tuple(self.radii))
        if self.fusion not in ("mean", "mutual"):
            raise MutualScoringError(f"mutual.fusion must be one of 'mean', 'mutual', got {self.fusion!r}.")
        if len(self.blocks) == 0:
            raise MutualScoringError("Mutual scoring needs at least one visual block (mutual.blocks), got none.")
        check_radii(self.radii)
        if not 0 < self.fraction <= 1:
            raise MutualScoringError(
                f"mutual.fraction must lie in (0, 1], got {self.fraction}: it is the share of the other images of "
                "the pool whose nearest-patch distances are averaged (0.3 in MuSc)."
            )
        if self.pool_size < self.min_pool:
            raise MutualScoringError(
                f"mutual.pool_size={self.pool_size} is below the smallest pool mutual scoring works with: "
                f"{self.min_pool} images at fraction={self.fraction}."
            )
        if self.rscin_k is not None and any(k < 1 for k in self.rscin_k):
            raise MutualScoringError(f"RsCIN neighbourhood sizes must be positive, got rscin_k={self.rscin_k}.")

    @property
    def min_pool(self) -> int:
        """Smallest pool (and subset) that can be scored: ``int((N - 1) * fraction) >= 1``."""
        return minimum_pool(self.fraction)


def lnamd(tokens: torch.Tensor, grid: tuple[int, int], radius: int) -> torch.Tensor:
    """LNAMD features: per-image LayerNorm, mean over the ``radius x radius`` neighbourhood, L2 norm.

    Args:
        tokens: (N, L, C) patch tokens of one block, any float dtype.
        grid: (H, W) token grid, ``H * W = L``.
        radius: odd neighbourhood size.

    Returns:
        (N, L, C) float32 unit-length tokens.
    """
    check_radii((radius,))
    count, length, channels = tokens.shape
    _check_grid(length, grid)
    maps = tokens.float().transpose(1, 2).reshape(count, channels, *grid)
    maps = F.layer_norm(maps, maps.shape[1:], eps=LAYER_NORM_EPS)
    if radius > 1:
        maps = F.avg_pool2d(maps, radius, stride=1, padding=radius // 2, count_include_pad=True)
    return F.normalize(maps.flatten(2).transpose(1, 2), dim=-1)


def nearest_token_distances(features: torch.Tensor, chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """Distance of each token to its nearest token in each other image.

    Args:
        features: (N, L, C) float32 tokens.
        chunk_tokens: reference tokens per matrix product (whole images, at least one).

    Returns:
        (N, N, L) table ``a[i, j, p] = min_q ||features[i, p] - features[j, q]||``, ``inf`` where ``i == j``.
    """
    count, length, _ = features.shape
    squared_norms = features.pow(2).sum(-1)
    nearest_squared = features.new_full((count, count, length), float("inf"))
    images_per_chunk = max(1, chunk_tokens // length)
    for query in range(count - 1):
        for start in range(query + 1, count, images_per_chunk):
            stop = min(start + images_per_chunk, count)
            squared = _squared_distances(
                features[query], squared_norms[query], features[start:stop].flatten(0, 1), squared_norms[start:stop]
            ).view(length, stop - start, length)
            nearest_squared[query, start:stop] = squared.amin(dim=2).transpose(0, 1)
            nearest_squared[start:stop, query] = squared.amin(dim=0)
    return nearest_squared.clamp_min(0).sqrt()


def _squared_distances(
    queries: torch.Tensor, query_norms: torch.Tensor, references: torch.Tensor, reference_norms: torch.Tensor
) -> torch.Tensor:
    """(Lq, Lr) matrix ``||x||^2 + ||y||^2 - 2 x.y`` from one matrix product."""
    products = torch.addmm(reference_norms.reshape(1, -1), queries, references.transpose(0, 1), alpha=-2)
    return products.add_(query_norms.unsqueeze(1))


def mutual_scores(features: torch.Tensor, fraction: float, chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """MSM patch scores (N, L): mean of the ``int((N - 1) * fraction)`` smallest nearest distances."""
    check_pool(features.shape[0], fraction)
    nearest = nearest_token_distances(features, chunk_tokens)
    kept = neighbours_kept(features.shape[0], fraction)
    return nearest.topk(kept, dim=1, largest=False).values.mean(dim=1)


def mutual_patch_scores(
    tokens_per_block: Sequence[torch.Tensor],
    grid: tuple[int, int],
    config: MutualScoring,
    chunk_tokens: int = CHUNK_TOKENS,
) -> torch.Tensor:
    """Patch scores (N, H, W) of one pool: LNAMD + MSM, mean over blocks and radii (no split).

    Args:
        tokens_per_block: one (N, L, C) tensor per block of ``config.blocks``, in that order.
        grid: (H, W) token grid.
        config: mutual scoring settings.
        chunk_tokens: reference tokens per matrix product.
    """
    count = _check_tokens(tokens_per_block, grid, config)
    check_pool(count, config.fraction)
    total = tokens_per_block[0].new_zeros(count, grid[0] * grid[1], dtype=torch.float32)
    for tokens in tokens_per_block:
        tokens = tokens.float()
        for radius in config.radii:
            total += mutual_scores(lnamd(tokens, grid, radius), config.fraction, chunk_tokens)
    return (total / (len(tokens_per_block) * len(config.radii))).view(count, *grid)


def upsample_maps(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Anomaly maps (N, 1, *size): patch scores (N, H, W) up-sampled bilinearly, corners aligned."""
    return F.interpolate(scores.unsqueeze(1), size=size, mode="bilinear", align_corners=True)


def rscin(
    scores: torch.Tensor, class_embeddings: torch.Tensor, ks: Sequence[int], chunk_rows: int = RSCIN_CHUNK_ROWS
) -> torch.Tensor:
    """RsCIN image scores (N,): min-max normalised scores averaged over class-embedding neighbours.

    Args:
        scores: (N,) image scores of the pool.
        class_embeddings: (N, D) class embeddings of the same images (normalised here).
        ks: neighbourhood sizes; each row keeps its ``min(k, N)`` most similar images, itself included.
        chunk_rows: rows of the (N, N) similarity computed at once, so that a pool of any size needs
            ``chunk_rows x N`` numbers, not ``N x N``.

    Returns:
        (N,) scores in [0, 1]; all zero when every input score is the same.
    """
    if class_embeddings.shape[0] != scores.shape[0]:
        raise ValueError(f"RsCIN got {class_embeddings.shape[0]} class embeddings for {scores.shape[0]} image scores.")
    if len(ks) == 0:
        raise ValueError("RsCIN needs at least one neighbourhood size k.")
    normalised = min_max(scores.float())
    embeddings = F.normalize(class_embeddings.to(scores.device, torch.float32), dim=-1)
    rows = []
    for start in range(0, embeddings.shape[0], chunk_rows):
        similarity = embeddings[start : start + chunk_rows] @ embeddings.transpose(0, 1)
        rows.append(torch.stack([_neighbour_weights(similarity, k) @ normalised for k in ks]).mean(dim=0))
    return torch.cat(rows)


def min_max(values: torch.Tensor) -> torch.Tensor:
    """``values`` scaled to [0, 1] by their minimum and maximum (all zero when they are all equal)."""
    return scale_to_range(values, values.min(), values.max())


def scale_to_range(values: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """``(values - low) / (high - low)``: [0, 1] for values within the range; all zero for an empty range."""
    spread = high - low
    return (values - low) / spread if spread > 0 else torch.zeros_like(values)


def value_range(values: torch.Tensor) -> torch.Tensor:
    """(2,) tensor: the minimum and maximum of ``values`` (float32)."""
    values = values.float()
    return torch.stack([values.min(), values.max()])


def fuse(
    prompt: torch.Tensor, mutual: torch.Tensor, fusion: MutualFusion, ranges: torch.Tensor | None = None
) -> torch.Tensor:
    """Fuse the prompts' and the mutual scores (or maps), each scaled by its range over the pool.

    Args:
        prompt: the prompts' scores or maps.
        mutual: the mutual scores or maps of the same images.
        fusion: ``mean`` averages the two scaled terms; ``mutual`` keeps the scaled mutual term.
        ranges: (2, 2) tensor: rows ``[min, max]`` of the prompts' and the mutual values over the whole pool, when
            ``prompt`` and ``mutual`` are only a part of it; ``None``: their own ranges.

    Returns:
        The fused values, in [0, 1].
    """
    prompt, mutual = prompt.float(), mutual.float()
    if ranges is None:
        ranges = torch.stack([value_range(prompt), value_range(mutual)])
    mutual_scaled = scale_to_range(mutual, ranges[1, 0], ranges[1, 1])
    if fusion == "mutual":
        return mutual_scaled
    return (scale_to_range(prompt, ranges[0, 0], ranges[0, 1]) + mutual_scaled) / 2


def fuse_with_prompts(
    prompt_scores: torch.Tensor,
    prompt_maps: torch.Tensor,
    mutual_scores: torch.Tensor,
    mutual_maps: torch.Tensor,
    fusion: MutualFusion,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and maps of a pool from the prompts' and the mutual ones, each on the pool's [0, 1] scale.

    Each term is min-max scaled over the pool (scores over the pool's images, maps over all their pixels),
    so that neither dominates by its range alone; ``mean`` averages the two, ``mutual`` keeps the mutual term.

    Args:
        prompt_scores: (N,) image scores of the prompts (zero- or few-shot).
        prompt_maps: (N, 1, H, W) anomaly maps of the prompts.
        mutual_scores: (N,) mutual image scores (after RsCIN when it runs).
        mutual_maps: (N, 1, H, W) mutual anomaly maps.
        fusion: ``mean`` or ``mutual``.

    Returns:
        (N,) scores and (N, 1, H, W) maps in [0, 1].
    """
    return fuse(prompt_scores, mutual_scores, fusion), fuse(prompt_maps, mutual_maps, fusion)


def _neighbour_weights(similarity: torch.Tensor, k: int) -> torch.Tensor:
    """Rows of ``similarity`` with their ``k`` largest entries kept, the rest 0, scaled to sum 1."""
    values, indices = similarity.topk(min(k, similarity.shape[1]), dim=1)
    weights = torch.zeros_like(similarity).scatter_(1, indices, values)
    return weights / weights.sum(dim=1, keepdim=True)


def split_pool(count: int, pool_size: int, seed: int, minimum: int) -> list[torch.Tensor]:
    """Subsets of ``range(count)`` scored on their own, reproducibly.

    Items are indexed in a fixed order (the caller's: sorted paths). A pool of at most ``pool_size``
    stays whole; a larger one is permuted with ``seed`` and cut into ``ceil(count / pool_size)``
    consecutive chunks whose sizes differ by at most one, fewer where that would leave a chunk below
    ``minimum`` (then a chunk may exceed ``pool_size``).

    Returns:
        Sorted (CPU, int64) index tensors that partition ``range(count)``.
    """
    if count < minimum:
        raise MutualScoringError(f"Mutual scoring needs a pool of at least {minimum} images, got a pool of {count}.")
    if count <= pool_size:
        return [torch.arange(count)]
    chunks = min(math.ceil(count / pool_size), count // minimum)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return [chunk.sort().values for chunk in order.tensor_split(chunks)]


def score_pool(
    tokens_per_block: Sequence[torch.Tensor],
    grid: tuple[int, int],
    image_size: tuple[int, int],
    config: MutualScoring,
    class_embeddings: torch.Tensor | None = None,
    chunk_tokens: int = CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mutual scoring of a pool: subsets, LNAMD, MSM, maps, then RsCIN over the whole pool.

    Args:
        tokens_per_block: one (N, L, C) tensor per block of ``config.blocks``, images in a fixed order.
        grid: (H, W) token grid, ``H * W = L``.
        image_size: (H_img, W_img) size of the maps.
        config: mutual scoring settings.
        class_embeddings: (N, D) class embeddings for RsCIN; None: no RsCIN.
        chunk_tokens: reference tokens per matrix product.

    Returns:
        Image scores (N,) and anomaly maps (N, 1, H_img, W_img), float32 on the tokens' device.
    """
    count = _check_tokens(tokens_per_block, grid, config)
    check_pool(count, config.fraction)
    patch_scores = tokens_per_block[0].new_empty(count, *grid, dtype=torch.float32)
    for subset in split_pool(count, config.pool_size, config.seed, config.min_pool):
        subset = subset.to(patch_scores.device)
        subset_tokens = [tokens[subset] for tokens in tokens_per_block]
        patch_scores[subset] = mutual_patch_scores(subset_tokens, grid, config, chunk_tokens)
    maps = upsample_maps(patch_scores, image_size)
    scores = maps.flatten(1).amax(dim=1)
    if config.rscin_k and class_embeddings is not None:
        scores = rscin(scores, class_embeddings, config.rscin_k)
    return scores, maps


def _check_grid(length: int, grid: tuple[int, int]) -> None:
    if grid[0] * grid[1] != length:
        raise ValueError(f"A {grid[0]} x {grid[1]} token grid holds {grid[0] * grid[1]} tokens, got {length}.")


def _check_tokens(tokens_per_block: Sequence[torch.Tensor], grid: tuple[int, int], config: MutualScoring) -> int:
    """Number of images after checking one (N, L, C) tensor per configured block."""
    if len(tokens_per_block) != len(config.blocks):
        raise ValueError(
            f"Got patch tokens of {len(tokens_per_block)} block(s) for the {len(config.blocks)} configured "
            f"blocks {config.blocks}."
        )
    shapes = {tuple(tokens.shape[:2]) for tokens in tokens_per_block}
    if len(shapes) != 1 or any(tokens.dim() != 3 for tokens in tokens_per_block):
        raise ValueError(f"Patch tokens must be (N, L, C) with the same N and L in every block, got shapes {shapes}.")
    count, length = shapes.pop()
    _check_grid(length, grid)
    return count

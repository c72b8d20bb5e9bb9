"""Tiled inference: small defects on large images, eager and in exported graphs.

Without tiling AnomalyCLIP squeezes every image to its input size (518 px): one 14 px patch then covers about
40 x 40 px of a 1500 x 1000 px board, and a defect of a few pixels vanishes inside one patch. A tiled model works at
a *working resolution* (each image's own size, or a size given with ``tiling.working_size``) and scores an image
(B, 3, H, W) at that resolution in these steps:

1. **tiles**: the image is cut into tiles of the model's input size ``t`` every ``stride`` pixels; where the stride
   does not reach the far edge, the last tile of a row (column) is placed flush with it, so that every tile is a
   crop of the image and nothing is padded;
2. **global view**: unless ``tiling.fusion`` is ``tiles``, the whole image resized to ``t x t`` (antialiased bicubic,
   written as two matrix products so that exported graphs compute it the same way);
3. the tiles and global views of the whole batch go through the dual-path encoder **in one call**;
4. per view, the zero-shot map (the layer maps summed, up-sampled from the patch grid) and, with a few-shot bank,
   the nearest-neighbour distance map. The tiles' maps are put back at their places and **averaged where tiles
   overlap** (with ``remove_border_count = r``, the ``r`` pixels along tile borders that are not image borders do
   not count, as anomalib's untile drops them); the global view's maps are up-sampled to H x W;
5. tiles and global view are fused by ``tiling.fusion`` (``s_t``: the zero-shot image score of tile ``t`` from its
   global embedding, ``s_g`` that of the global view; ``M``: a map, zero-shot and few-shot alike):

   .. code-block:: text

       mean:   M = (M_tiles + M_global) / 2       s = (max_t s_t + s_g) / 2
       max:    M = max(M_tiles, M_global)         s = max(max_t s_t, s_g)
       tiles:  M = M_tiles                        s = max_t s_t            (no global view is computed)

6. the fused maps are smoothed and, with references, fused with the few-shot map as without tiling
   (:mod:`.few_shot`): the maps keep their scale, so thresholds and post-processing are unchanged.

With ``k_shot`` references the bank holds the patch tokens of every view of every reference (tiles and global view,
same tiling), so ``k`` normal images cover every region of the product; its size is logged
(:meth:`~anomalib_anomalyclip.method.torch_model.AnomalyCLIPModel.describe_bank`).

Tiling is switched on by the model's ``tiling`` group (``--model.tiling true``, or its fields ``tile_size``,
``stride``, ``working_size``, ``fusion``) or by anomalib's ``TilerConfigurationCallback``, which sets the torch
model's ``tiler`` as it does for PatchCore (its tile size and stride are used; ``mode`` is not needed, since no
tile is padded). Either way the pre-processor then resizes to the working resolution (or not at all) instead of the
input size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from anomalib.data import InferenceBatch

from anomalib_anomalyclip.config import TileFusionName, Tiling
from anomalib_anomalyclip.errors import AnomalyCLIPError, parse_choice
from anomalib_anomalyclip.method.few_shot import FewShotScorer, smoothed_outputs
from anomalib_anomalyclip.method.resize import resampling_matrix
from anomalib_anomalyclip.method.scoring import GaussianSmoothing, image_scores, summed_anomaly_map

if TYPE_CHECKING:
    from anomalib.data.utils.tiler import Tiler

    from anomalib_anomalyclip.method.dpam import DualPathVisualEncoder, Tap, VisualFeatures

__all__ = [
    "TileFusion",
    "TileFusionName",
    "TilingConfig",
    "TilingError",
    "as_tiler",
    "bank_rows",
    "cut_views",
    "encode_views",
    "fuse_views",
    "join_tiles",
    "pair",
    "score_tiled",
    "score_views",
    "tiling_config",
    "tiling_from_tiler",
]

Pair = tuple[int, int]
VIEWS_PER_CALL = 32  # encoder inputs per call in eager runs (the views of one image always go together)


class TileFusion(str, Enum):
    """How the tiles' maps and scores join the global view's (see the module docstring)."""

    MEAN = "mean"
    MAX = "max"
    TILES = "tiles"


class TilingError(AnomalyCLIPError, ValueError):
    """Tiling settings that cannot work; the message names the value and what to use instead."""


@dataclass(frozen=True)
class TilingConfig:
    """Checked tiling settings (build them with :func:`tiling_config`).

    Attributes:
        tile_size: (height, width) of a tile: the model's input size.
        stride: (vertical, horizontal) step between tiles, at most the tile size.
        working_size: (height, width) the images are resized to before tiling; ``None``: each image's own size.
        fusion: how tiles and the global view are fused.
        remove_border_count: pixels along inner tile borders left out of the average.
    """

    tile_size: Pair
    stride: Pair
    working_size: Pair | None = None
    fusion: TileFusion = TileFusion.MEAN
    remove_border_count: int = 0

    @property
    def global_view(self) -> bool:
        """Whether the whole image is also scored at the input size."""
        return self.fusion is not TileFusion.TILES

    def tile_starts(self, size: Sequence[int]) -> tuple[list[int], list[int]]:
        """Top and left edges of the tiles of an image of ``size`` (height, width).

        Raises:
            TilingError: the image is smaller than a tile.
        """
        if size[0] < self.tile_size[0] or size[1] < self.tile_size[1]:
            raise TilingError(
                f"An image of {size[0]}x{size[1]} px is smaller than a tile ({self.tile_size[0]}x{self.tile_size[1]} "
                "px). Give a larger --model.tiling.working_size, or score such images without tiling."
            )
        return (
            _starts(int(size[0]), self.tile_size[0], self.stride[0]),
            _starts(int(size[1]), self.tile_size[1], self.stride[1]),
        )

    def tile_count(self, size: Sequence[int]) -> int:
        """Number of tiles of an image of ``size``."""
        rows, columns = self.tile_starts(size)
        return len(rows) * len(columns)

    def views_per_image(self, size: Sequence[int]) -> int:
        """Encoder inputs per image: its tiles and, unless ``tiles`` fusion, its global view."""
        return self.tile_count(size) + int(self.global_view)


def _starts(length: int, tile: int, stride: int) -> list[int]:
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)  # flush with the far edge
    return starts


def pair(value: int | Sequence[int], name: str) -> Pair:
    """``value`` as (height, width) of positive pixel counts; :class:`TilingError` naming ``name`` otherwise."""
    sides = (value, value) if isinstance(value, int) else tuple(value)
    if len(sides) != 2 or not all(isinstance(side, int) and side > 0 for side in sides):
        raise TilingError(f"{name} must be a positive number of pixels or a (height, width) pair, got {value!r}.")
    return int(sides[0]), int(sides[1])


def tiling_config(
    tile_size: int | Sequence[int],
    stride: int | Sequence[int] | None,
    input_size: int,
    options: Tiling | None = None,
    remove_border_count: int = 0,
) -> TilingConfig:
    """Tiling settings, checked against the model's input size.

    Args:
        tile_size: side (or height, width) of a tile; must be the model's input size.
        stride: step between tiles; ``None``: the tile size (no overlap).
        input_size: the model's input size (``image_size``).
        options: the model's tiling group, for its working size and fusion; ``None``: each image's own size,
            ``mean`` fusion.
        remove_border_count: pixels along inner tile borders left out of the average.

    Raises:
        TilingError: a tile other than the input size, a stride larger than a tile, a working size smaller than a
            tile, or a border that leaves nothing of a tile.
    """
    options = options or Tiling()
    tile = pair(tile_size, "tiling.tile_size")
    if tile != (input_size, input_size):
        raise TilingError(
            f"tiling.tile_size {tile[0]}x{tile[1]} differs from the model's input size {input_size}: every tile is one "
            f"input of the CLIP encoder. Use tile_size {input_size} (and choose the working resolution with "
            "--model.tiling.working_size), or change --model.image_size."
        )
    step = tile if stride is None else pair(stride, "tiling.stride")
    if step[0] > tile[0] or step[1] > tile[1]:
        raise TilingError(
            f"The tile stride {step[0]}x{step[1]} is larger than the tile ({tile[0]}x{tile[1]}), which would leave "
            f"strips of the image unseen. Use a stride of at most {tile[0]} (e.g. {tile[0] * 3 // 4} for a quarter "
            "overlap)."
        )
    working = None if options.working_size is None else pair(options.working_size, "tiling.working_size")
    if working is not None and (working[0] < tile[0] or working[1] < tile[1]):
        raise TilingError(
            f"The working resolution {working[0]}x{working[1]} is smaller than a tile ({tile[0]}x{tile[1]}). Give "
            f"--model.tiling.working_size of at least {tile[0]} per side (tiling pays off well above it), or leave it "
            "out to tile each image at its own size."
        )
    overlap = min(tile[0] - step[0], tile[1] - step[1])
    if remove_border_count < 0 or 2 * remove_border_count > overlap:
        raise TilingError(
            f"remove_border_count {remove_border_count} leaves pixels that no tile covers: tiles overlap by {overlap} "
            "px (tile size minus stride), which must be at least twice the border. Use a smaller stride or border."
        )
    fusion = parse_choice(TileFusion, options.fusion, "tiling.fusion")
    return TilingConfig(tile, step, working, fusion, remove_border_count)


def tiling_from_tiler(tiler: Tiler, input_size: int, options: Tiling) -> TilingConfig:
    """The tiling an anomalib ``Tiler`` (as ``TilerConfigurationCallback`` builds it) asks for."""
    tile = (tiler.tile_size_h, tiler.tile_size_w)
    stride = (getattr(tiler, "stride_h", tile[0]), getattr(tiler, "stride_w", tile[1]))
    return tiling_config(tile, stride, input_size, options, int(tiler.remove_border_count))


def as_tiler(tiling: TilingConfig) -> Tiler:
    """An anomalib ``Tiler`` with the tile size, stride and border of ``tiling`` (for code that reads ``tiler``)."""
    from anomalib.data.utils.tiler import Tiler

    return Tiler(tiling.tile_size, tiling.stride, remove_border_count=tiling.remove_border_count)


# --------------------------------------------------------------------------------------------------------------------
# Tiles in, one map out
# --------------------------------------------------------------------------------------------------------------------


def cut_views(images: torch.Tensor, tiling: TilingConfig) -> torch.Tensor:
    """Every image's tiles, then (unless ``tiles`` fusion) its global view: (B * views, C, t, t), image by image."""
    rows, columns = tiling.tile_starts(images.shape[-2:])
    height, width = tiling.tile_size
    views = [images[:, :, top : top + height, left : left + width] for top in rows for left in columns]
    if tiling.global_view:
        views.append(resize_linear(images, tiling.tile_size))
    return torch.stack(views, dim=1).flatten(0, 1)


def resize_linear(images: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Antialiased bicubic resize of (B, C, H, W) float images (PIL's kernel, no rounding) as matrix products."""
    vertical = resampling_matrix(int(images.shape[-2]), int(size[0]), images)
    horizontal = resampling_matrix(int(images.shape[-1]), int(size[1]), images)
    return vertical @ images @ horizontal.transpose(0, 1)


def join_tiles(maps: torch.Tensor, tiling: TilingConfig, size: Sequence[int]) -> torch.Tensor:
    """Tiles' maps (B * tiles, C, t, t), in the order of :func:`cut_views`, put back into (B, C, H, W) maps.

    Overlaps are averaged; with ``remove_border_count`` the inner tile borders do not count. A tile's weights are the
    product of a vertical and a horizontal profile, so the coverage of the image is one too.
    """
    rows, columns = tiling.tile_starts(size)
    vertical = _profiles(maps, rows, tiling.tile_size[0], int(size[0]), tiling.remove_border_count)
    horizontal = _profiles(maps, columns, tiling.tile_size[1], int(size[1]), tiling.remove_border_count)
    tiles = maps.reshape(-1, len(rows), len(columns), *maps.shape[1:])
    if tiling.remove_border_count:
        tiles = tiles * (vertical[:, None, None, :, None] * horizontal[None, :, None, None, :])
    total = _place(tiles, rows, columns, size)
    coverage = _coverage(vertical, rows, int(size[0]))[:, None] * _coverage(horizontal, columns, int(size[1]))
    return total / coverage


def _profiles(like: torch.Tensor, starts: Sequence[int], tile: int, length: int, border: int) -> torch.Tensor:
    """(tiles, t) weights of the tiles along one axis: 1, and 0 on the ``border`` pixels of inner tile edges."""
    profiles = like.new_ones(len(starts), tile)
    for index, start in enumerate(starts):
        if border and start > 0:
            profiles[index, :border] = 0
        if border and start + tile < length:
            profiles[index, tile - border :] = 0
    return profiles


def _coverage(profiles: torch.Tensor, starts: Sequence[int], length: int) -> torch.Tensor:
    """(length,) sum of the tiles' profiles at their places along one axis."""
    tile = profiles.shape[-1]
    return sum(F.pad(profile, (start, length - start - tile)) for profile, start in zip(profiles, starts, strict=True))


def _place(tiles: torch.Tensor, rows: Sequence[int], columns: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """Sum of (B, rows, columns, C, t, t) tiles zero-padded to their places in (B, C, H, W).

    Padding (a row of tiles into a strip, then the strip into the image) rather than writing into slices: exported
    graphs of it stay small (ONNX's scatter of slices took minutes to export) and eager runs touch each pixel of the
    image once per row of tiles.
    """
    height, width = tiles.shape[-2:]
    total = None
    for row, top in enumerate(rows):
        strip = None
        for column, left in enumerate(columns):
            placed = F.pad(tiles[:, row, column], (left, int(size[1]) - left - width))
            strip = placed if strip is None else strip + placed
        placed = F.pad(strip, (0, 0, top, int(size[0]) - top - height))
        total = placed if total is None else total + placed
    return total


def fuse_views(tiles: torch.Tensor, whole: torch.Tensor | None, fusion: TileFusion) -> torch.Tensor:
    """Tiles' map (or score) with the global view's, by ``fusion``."""
    if whole is None or fusion is TileFusion.TILES:
        return tiles
    if fusion is TileFusion.MAX:
        return torch.maximum(tiles, whole)
    return (tiles + whole) / 2


# --------------------------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------------------------


def encode_views(
    visual_encoder: DualPathVisualEncoder, images: torch.Tensor, tiling: TilingConfig, extra_taps: Sequence[Tap] = ()
) -> VisualFeatures:
    """The features of every view (B * views rows, views as :func:`cut_views` orders them), in one encoder call."""
    return visual_encoder.encode(cut_views(images, tiling), extra_taps)


def score_views(
    features: VisualFeatures,
    size: Sequence[int],
    tiling: TilingConfig,
    grid: Pair,
    smoothing: GaussianSmoothing,
    text_features: torch.Tensor,
    few_shot: FewShotScorer | None = None,
) -> InferenceBatch:
    """Scores (B,) and maps (B, 1, H, W) of images of ``size`` from their views' features (see the module docstring).

    Args:
        features: the views' features (:func:`encode_views`); with an active ``few_shot`` bank, its taps' tokens are
            the extra tokens.
        size: (H, W) of the images (the working resolution).
        tiling: the tiling the views were cut with.
        grid: patch grid of one view.
        smoothing: the maps' Gaussian smoothing.
        text_features: (1, 2, D) normalised text features.
        few_shot: the memory bank; ``None`` or empty: zero-shot.
    """
    size = (int(size[0]), int(size[1]))
    views, tiles = tiling.views_per_image(size), tiling.tile_count(size)
    bank = few_shot is not None and few_shot.active
    tokens = features.patch_tokens + (features.extra_tokens if bank else [])
    layers = len(features.patch_tokens)
    scores = image_scores(features.global_embedding, text_features).reshape(-1, views)
    score = fuse_views(scores[:, :tiles].amax(dim=1), scores[:, tiles] if tiling.global_view else None, tiling.fusion)
    by_view = [layer.reshape(-1, views, *layer.shape[1:]) for layer in tokens]

    def maps(view: slice | int, map_size: Pair) -> torch.Tensor:
        """The zero-shot map and, with a bank, the few-shot map of some views, as channels."""
        chosen = [layer[:, view].reshape(-1, *layer.shape[2:]) for layer in by_view]
        kinds = [summed_anomaly_map(chosen[:layers], text_features, grid, map_size)]
        if layers < len(tokens):
            kinds.append(few_shot.distance_map(chosen[layers:], grid, map_size))
        return torch.cat(kinds, dim=1)

    joined = join_tiles(maps(slice(0, tiles), tiling.tile_size), tiling, size)  # both kinds of map joined at once
    if tiling.global_view:
        joined = fuse_views(joined, maps(tiles, size), tiling.fusion)
    few_shot_map = joined[:, 1:] if layers < len(tokens) else None
    return smoothed_outputs(score, joined[:, :1], few_shot_map, layers, smoothing, few_shot)


def score_tiled(
    visual_encoder: DualPathVisualEncoder,
    smoothing: GaussianSmoothing,
    images: torch.Tensor,
    text_features: torch.Tensor,
    few_shot: FewShotScorer | None,
    tiling: TilingConfig,
) -> InferenceBatch:
    """Image scores (B,) and maps (B, 1, H, W) of CLIP-normalised images (B, 3, H, W) at the working resolution.

    The views of one image always go through the encoder together; eager runs encode at most
    :data:`VIEWS_PER_CALL` views at once (several images' when they fit), an exported graph the whole batch.
    """
    per_call = max(1, VIEWS_PER_CALL // tiling.views_per_image(images.shape[-2:]))
    if not torch.compiler.is_compiling() and images.shape[0] > per_call:
        parts = [
            score_tiled(visual_encoder, smoothing, part, text_features, few_shot, tiling)
            for part in images.split(per_call)
        ]
        return InferenceBatch(
            pred_score=torch.cat([part.pred_score for part in parts]),
            anomaly_map=torch.cat([part.anomaly_map for part in parts]),
        )
    active = few_shot if few_shot is not None and few_shot.active else None
    features = encode_views(visual_encoder, images, tiling, active.taps if active is not None else ())
    grid = visual_encoder.grid_size(tiling.tile_size)
    return score_views(features, images.shape[-2:], tiling, grid, smoothing, text_features, active)


def bank_rows(tokens: torch.Tensor, views: int) -> torch.Tensor:
    """Per-view tokens (k * views, N, D) of ``k`` references as (k, views * N, D): each reference's rows together."""
    return tokens.reshape(-1, views * tokens.shape[1], tokens.shape[-1])

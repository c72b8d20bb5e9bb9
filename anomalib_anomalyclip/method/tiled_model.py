"""Tiled inference in the torch model (the method is in :mod:`.tiling`).

* :class:`TiledModel` gives :class:`~anomalib_anomalyclip.method.torch_model.AnomalyCLIPModel` its tiling options, its
  ``tiler`` (what anomalib's ``TilerConfigurationCallback`` sets) and a few-shot bank of tiles;
* :func:`check_tiled_training` and :func:`check_tiled_export` refuse what tiling cannot do, saying what to do.

The pre-processor follows the tiling's working resolution (:func:`.pre_processor.follow_tiling`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from anomalib.data import InferenceBatch

from anomalib_anomalyclip.config import Tiling
from anomalib_anomalyclip.method.dpam import VisualFeatures
from anomalib_anomalyclip.method.few_shot import FewShotScorer, score_leaving_out
from anomalib_anomalyclip.method.tiling import (
    TilingConfig,
    TilingError,
    as_tiler,
    bank_rows,
    encode_views,
    pair,
    score_views,
    tiling_config,
    tiling_from_tiler,
)

if TYPE_CHECKING:
    from anomalib.data.utils.tiler import Tiler

__all__ = ["TiledModel", "check_tiled_export", "check_tiled_training"]


class TiledModel:
    """Tiled inference for :class:`~anomalib_anomalyclip.method.torch_model.AnomalyCLIPModel` (mixed into it).

    ``tiling`` is ``None`` (untiled) until :meth:`configure_tiling` or anomalib's ``TilerConfigurationCallback``
    (through :attr:`tiler`) switches it on; ``tiling_options`` (the model's tiling group) give the working size and
    fusion, also to a ``Tiler`` set from outside.
    """

    tiling: TilingConfig | None = None
    tiling_options: Tiling = Tiling()

    @property
    def input_resolution(self) -> tuple[int, int] | None:
        """What the pre-processor resizes images to: the input size, the tiling's working size, or ``None``."""
        if self.tiling is None:
            return (self.image_size, self.image_size)
        return self.tiling.working_size

    def configure_tiling(self, options: Tiling) -> None:
        """Tile as ``options`` say when enabled (their tile size and stride; the input size by default).

        A ``Tiler`` set later (:attr:`tiler`) switches tiling on with its tiles and the working size and fusion of
        ``options``.
        """
        self.tiling_options = options
        tile_size = options.tile_size or self.image_size
        self.use_tiling(tiling_config(tile_size, options.stride, self.image_size, options) if options.enabled else None)

    @property
    def tiler(self) -> Tiler | None:
        """The anomalib ``Tiler`` of the current tiling (``None``: untiled).

        Setting one switches tiling on, as for PatchCore: its tile size, stride and border count, with the working
        size and fusion of :attr:`tiling_options`.
        """
        return None if self.tiling is None else as_tiler(self.tiling)

    @tiler.setter
    def tiler(self, tiler: Tiler | None) -> None:
        self.use_tiling(None if tiler is None else tiling_from_tiler(tiler, self.image_size, self.tiling_options))

    def use_tiling(self, tiling: TilingConfig | None) -> None:
        """Score tiled from now on (``None``: untiled again).

        Raises:
            TilingError: the model does mutual scoring (a pool of whole images), or the tile is not the input size.
        """
        if tiling is not None and self.mutual is not None:
            raise TilingError(
                "Tiling and mutual scoring do not combine: mutual scoring compares whole images of a pool. Switch one "
                "off (--model.mutual false, or --model.tiling false and no TilerConfigurationCallback)."
            )
        if tiling is not None and tiling.tile_size != (self.image_size, self.image_size):
            tiling_config(tiling.tile_size, tiling.stride, self.image_size)  # raises, saying what to use
        self.tiling = tiling

    def remember_tiled_references(self, images: torch.Tensor) -> InferenceBatch | None:
        """Fill the few-shot bank with every view (tiles, global view) of each reference; see ``remember_references``.

        Args:
            images: (k, 3, H, W) CLIP-normalised references at the working resolution, encoded one at a time.
        """
        size = images.shape[-2:]
        views = self.tiling.views_per_image(size)
        with torch.no_grad():
            parts = [
                encode_views(self.visual_encoder, image, self.tiling, self.few_shot.taps) for image in images.split(1)
            ]
        features = VisualFeatures.cat(parts)
        self.few_shot.remember([bank_rows(layer, views) for layer in features.extra_tokens])
        if images.shape[0] < 2:
            return None
        return self._tiled_leave_one_out(features, size, views)

    def _tiled_leave_one_out(self, features: VisualFeatures, size: Sequence[int], views: int) -> InferenceBatch:
        grid = self.visual_encoder.grid_size(self.tiling.tile_size)
        text_features = self.inference_text_features()

        def score_one(index: int, scorer: FewShotScorer) -> InferenceBatch:
            one = features.select(slice(index * views, (index + 1) * views))
            return score_views(one, size, self.tiling, grid, self.smoothing, text_features, scorer)

        return score_leaving_out(self.few_shot, features.global_embedding.shape[0] // views, score_one)


def check_tiled_training(tiling: TilingConfig | None) -> None:
    """Refuse to learn prompts with tiling on (prompt training runs on untiled images)."""
    if tiling is not None:
        raise TilingError(
            "Tiling is for scoring: prompts are learned on whole images at the model's input size. Learn the prompts "
            "without tiling (anomalib fit), then test or predict with the checkpoint and --model.tiling true."
        )


def check_tiled_export(tiling: TilingConfig | None, input_size: Sequence[int] | None) -> TilingConfig | None:
    """The tiling an export uses: a model tiling each image at its own size needs a fixed ``input_size``.

    Raises:
        TilingError: no working size and no ``input_size`` (the number of tiles must be known to the graph).
    """
    if tiling is None or tiling.working_size is not None:
        return tiling
    if input_size is None:
        raise TilingError(
            "This tiled model works at each image's own size, but an exported graph needs a fixed number of tiles. "
            "Export with --input_size H W (the size of your images), or build the model with "
            "--model.tiling.working_size [H, W] (the graph then resizes any image to it)."
        )
    return replace(tiling, working_size=pair(tuple(input_size), "input_size"))

"""The studies' one point of contact with an AnomalyCLIP model's visual features and prompts.

The studies encode each image once and then score it many times (zero-shot, every ``k``, every fusion), which the
public :class:`~anomalib_anomalyclip.torch_model.AnomalyCLIPModel` methods cannot express yet: it has no method that
returns the features of a batch together with a few-shot bank's tokens, ``scores_from_features`` takes no bank, and
the prompts have no save method. Until it has them (``feature_taps``, ``encode_images``, a ``few_shot`` argument of
``scores_from_features`` and ``save_prompts``), the functions below stand in for those methods, and they are the
only place of this package that reaches inside the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from anomalib.data import InferenceBatch

    from anomalib_anomalyclip.dpam import Tap
    from anomalib_anomalyclip.few_shot import FewShotScorer
    from anomalib_anomalyclip.torch_model import AnomalyCLIPModel

__all__ = ["VisualFeatures", "encode_images", "feature_taps", "save_prompts", "scores_from_features"]


class VisualFeatures(NamedTuple):
    """The visual features of a batch, computed once and scored as often as needed.

    Attributes:
        global_embedding: (B, D) global embeddings.
        patch_tokens: per feature layer, (B, N, D) patch tokens (the zero-shot maps').
        extra_tokens: per extra tap, (B, N, D) patch tokens (e.g. those a few-shot bank reads).
    """

    global_embedding: torch.Tensor
    patch_tokens: list[torch.Tensor]
    extra_tokens: list[torch.Tensor]


def feature_taps(model: AnomalyCLIPModel) -> tuple[Tap, ...]:
    """Where ``model``'s anomaly maps read patch tokens: one tap per feature layer."""
    return model.visual_encoder.feature_taps


def encode_images(model: AnomalyCLIPModel, images: torch.Tensor, extra_taps: Sequence[Tap] = ()) -> VisualFeatures:
    """The visual features of CLIP-normalised images (B, 3, H, W), in one pass without gradients.

    Args:
        model: the torch model.
        images: the batch.
        extra_taps: further taps to read in the same pass.

    Returns:
        The global embeddings, the feature layers' patch tokens and the extra taps' tokens.
    """
    taps = feature_taps(model)
    with torch.no_grad():
        global_embedding, tokens = model.visual_encoder(images, taps + tuple(extra_taps))
    return VisualFeatures(global_embedding, tokens[: len(taps)], tokens[len(taps) :])


def scores_from_features(
    model: AnomalyCLIPModel, features: VisualFeatures, size: Sequence[int], few_shot: FewShotScorer | None = None
) -> InferenceBatch:
    """What ``model`` returns in eval mode for the images of ``features``, optionally with a given bank.

    Args:
        model: the torch model.
        features: the images' features; with ``few_shot``, ``extra_tokens`` are read at the bank's taps.
        size: (H, W) of the images.
        few_shot: a filled few-shot bank (see ``AnomalyCLIPModel.build_few_shot_scorer``), or ``None``: zero-shot.

    Returns:
        ``pred_score`` (B,) and ``anomaly_map`` (B, 1, H, W).
    """
    size = (int(size[0]), int(size[1]))
    with torch.no_grad():
        if few_shot is None:
            return model.scores_from_features(features.global_embedding, features.patch_tokens, size)
        from anomalib_anomalyclip.inference_model import score_features

        grid = model.visual_encoder.grid_size(size)
        text_features = model.inference_text_features()
        return score_features(
            features.global_embedding,
            features.patch_tokens,
            grid,
            size,
            model.smoothing,
            text_features,
            few_shot,
            features.extra_tokens,
        )


def save_prompts(model: AnomalyCLIPModel, path: str | Path) -> Path:
    """Save ``model``'s prompts as a prompt file (loadable as ``prompt_weights``); returns ``path``."""
    from anomalib_anomalyclip.prompts import save_prompts as save_learner

    return save_learner(model.prompt_learner, path)

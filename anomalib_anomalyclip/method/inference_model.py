"""AnomalyCLIP at inference: the visual path with the two text embeddings as constants.

Once the prompts are fixed, the text side of AnomalyCLIP is a constant pair of
embeddings (normal, abnormal). :class:`AnomalyCLIPInferenceModel` holds only what
scoring an image needs: the visual encoder with DPAM, those two embeddings as a
buffer, the few-shot memory bank when there is one (see :mod:`.few_shot`), and the
map smoothing. It is what :class:`anomalib_anomalyclip.AnomalyCLIP`
exports (ONNX, OpenVINO, Torch), so an exported graph holds no text encoder.

Example:
    >>> import torch
    >>> from anomalib_anomalyclip.method.torch_model import AnomalyCLIPModel
    >>> full = AnomalyCLIPModel(pretrained="/models/ViT-L-14-336px.pt",
    ...                         prompt_weights="/models/anomalyclip_visa.pth")  # doctest: +SKIP
    >>> model = full.inference_model()  # doctest: +SKIP
    >>> model(torch.randn(1, 3, 518, 518)).anomaly_map.shape  # doctest: +SKIP
    torch.Size([1, 1, 518, 518])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from anomalib.data import InferenceBatch
from torch import nn

from anomalib_anomalyclip.method.dpam import DualPathVisualEncoder
from anomalib_anomalyclip.method.few_shot import FewShotScorer, smoothed_outputs
from anomalib_anomalyclip.method.scoring import GaussianSmoothing, image_scores, summed_anomaly_map
from anomalib_anomalyclip.method.tiling import TilingConfig, score_tiled


def score_images(
    visual_encoder: DualPathVisualEncoder,
    smoothing: GaussianSmoothing,
    images: torch.Tensor,
    text_features: torch.Tensor,
    few_shot: FewShotScorer | None = None,
) -> InferenceBatch:
    """Image scores and smoothed anomaly maps of CLIP-normalised images.

    Args:
        visual_encoder: the dual-path visual encoder.
        smoothing: the Gaussian smoothing of the maps.
        images: (B, 3, H, W) CLIP-normalised images.
        text_features: (1, 2, D) normalised text features, ``[:, 0]`` normal, ``[:, 1]`` abnormal.
        few_shot: the memory bank of normal patch tokens; ``None`` or empty: zero-shot.

    Returns:
        ``pred_score`` (B,) and ``anomaly_map`` (B, 1, H, W).
    """
    bank_taps = few_shot.taps if few_shot is not None and few_shot.active else ()
    features = visual_encoder.encode(images, bank_taps)
    size = (images.shape[-2], images.shape[-1])
    grid = visual_encoder.grid_size(size)
    return score_features(
        features.global_embedding, features.patch_tokens, grid, size, smoothing, text_features, few_shot,
        features.extra_tokens,
    )  # fmt: skip


def score_batch(
    visual_encoder: DualPathVisualEncoder,
    smoothing: GaussianSmoothing,
    images: torch.Tensor,
    text_features: torch.Tensor,
    few_shot: FewShotScorer | None = None,
    tiling: TilingConfig | None = None,
) -> InferenceBatch:
    """Scores and maps of CLIP-normalised images, untiled (:func:`score_images`) or tiled (:func:`.tiling.score_tiled`).

    The one scoring path of the eager model and of exported graphs.
    """
    if tiling is not None:
        return score_tiled(visual_encoder, smoothing, images, text_features, few_shot, tiling)
    return score_images(visual_encoder, smoothing, images, text_features, few_shot)


def score_features(
    global_embedding: torch.Tensor,
    patch_tokens: Sequence[torch.Tensor],
    grid: tuple[int, int],
    size: tuple[int, int],
    smoothing: GaussianSmoothing,
    text_features: torch.Tensor,
    few_shot: FewShotScorer | None = None,
    bank_tokens: Sequence[torch.Tensor] = (),
) -> InferenceBatch:
    """Image scores and smoothed anomaly maps from the visual encoder's outputs.

    Args:
        global_embedding: (B, D) global embeddings.
        patch_tokens: per feature layer, (B, N, D) patch tokens on a ``grid`` of patches.
        grid: (rows, columns) of patches.
        size: (H, W) of the maps: the size of the images the features come from.
        smoothing: the Gaussian smoothing of the maps.
        text_features: (1, 2, D) normalised text features, ``[:, 0]`` normal, ``[:, 1]`` abnormal.
        few_shot: the memory bank; ``None`` or empty: the zero-shot score and map.
        bank_tokens: per bank tap, (B, N, D) patch tokens (needed when ``few_shot`` is active).

    Returns:
        ``pred_score`` (B,) and ``anomaly_map`` (B, 1, H, W): zero-shot maps lie in [0,
        number of feature layers], fused few-shot maps in [0, 1].
    """
    zero_shot_map = summed_anomaly_map(patch_tokens, text_features, grid, size)
    zero_shot_score = image_scores(global_embedding, text_features)
    if few_shot is None or not few_shot.active:
        return smoothed_outputs(zero_shot_score, zero_shot_map, None, len(patch_tokens), smoothing)
    few_shot_map = few_shot.distance_map(bank_tokens, grid, size)
    return smoothed_outputs(zero_shot_score, zero_shot_map, few_shot_map, len(patch_tokens), smoothing, few_shot)


class AnomalyCLIPInferenceModel(nn.Module):
    """Scores images with fixed text embeddings; no prompts, no text encoder.

    Args:
        visual_encoder: the dual-path visual encoder (shared, not copied).
        text_features: (1, 2, D) normalised text features of the fixed prompts; kept as a
            buffer (a constant of an exported graph).
        smoothing: the Gaussian smoothing of the maps (shared, not copied).
        few_shot: the few-shot memory bank (shared, not copied; its bank becomes a constant
            of an exported graph), or ``None``.
        tiling: tiled inference at a fixed working size (see :mod:`.tiling`), or ``None``.
    """

    def __init__(
        self,
        visual_encoder: DualPathVisualEncoder,
        text_features: torch.Tensor,
        smoothing: GaussianSmoothing,
        few_shot: FewShotScorer | None = None,
        tiling: TilingConfig | None = None,
    ) -> None:
        super().__init__()
        self.tiling = tiling
        if text_features.dim() != 3 or text_features.shape[:2] != (1, 2):
            raise ValueError(f"Expected text features of shape (1, 2, D), got {tuple(text_features.shape)}.")
        self.visual_encoder = visual_encoder
        self.smoothing = smoothing
        self.few_shot = few_shot
        self.register_buffer("text_features", text_features.detach().clone())

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        """Score a batch of CLIP-normalised images (B, 3, H, W); see :func:`score_images` (tiled: :mod:`.tiling`)."""
        return score_batch(self.visual_encoder, self.smoothing, images, self.text_features, self.few_shot, self.tiling)

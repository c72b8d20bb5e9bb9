"""Mutual scoring in the torch model: a pool's images encoded once, then scored against each other (:mod:`.mutual`).

:class:`PooledModel` is mixed into :class:`~anomalib_anomalyclip.method.torch_model.AnomalyCLIPModel`, as
:class:`~anomalib_anomalyclip.method.tiled_model.TiledModel` is; a run's pools are planned, streamed and stored by
:mod:`anomalib_anomalyclip.integration.pool_scoring`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from anomalib.data import InferenceBatch
from torch import nn

from anomalib_anomalyclip.method.dpam import DualPathVisualEncoder, Tap, TokenPath, check_layers
from anomalib_anomalyclip.method.few_shot import FewShotScorer
from anomalib_anomalyclip.method.inference_model import score_features
from anomalib_anomalyclip.method.mutual import MutualScoring, MutualScoringError, fuse_with_prompts
from anomalib_anomalyclip.method.mutual import score_pool as score_mutually
from anomalib_anomalyclip.method.scoring import GaussianSmoothing

__all__ = ["EncodedBatch", "PoolMemberInferenceModel", "PooledModel", "encode_pool_member"]


class EncodedBatch(NamedTuple):
    """A batch of images encoded once for mutual scoring: the prompts' scores and maps, and what mutual scoring needs.

    Attributes:
        pred_score: (B,) image scores of the prompts (zero-shot, or fused with the few-shot bank).
        anomaly_map: (B, 1, H, W) maps of the prompts, on [0, 1] (zero-shot maps divided by the layer count).
        pool_tokens: (B, K, L, C) raw residual-stream patch tokens of the K mutual-scoring blocks, in float16.
        class_embedding: (B, D) CLIP's image embeddings (for RsCIN).

    The field names are also the output names of an exported graph of a mutual-scoring model.
    """

    pred_score: torch.Tensor
    anomaly_map: torch.Tensor
    pool_tokens: torch.Tensor
    class_embedding: torch.Tensor

    @property
    def tokens(self) -> list[torch.Tensor]:
        """Per mutual-scoring block, the (B, L, C) tokens."""
        return list(self.pool_tokens.unbind(1))


def encode_pool_member(
    visual_encoder: DualPathVisualEncoder,
    smoothing: GaussianSmoothing,
    text_features: torch.Tensor,
    few_shot: FewShotScorer | None,
    blocks: Sequence[int],
    images: torch.Tensor,
) -> EncodedBatch:
    """One encoder pass over CLIP-normalised ``images`` (B, 3, H, W): the prompts' outputs and the mutual tokens.

    Args:
        visual_encoder: the dual-path visual encoder.
        smoothing: the Gaussian smoothing of the prompts' maps.
        text_features: (1, 2, D) normalised text features of the prompts.
        few_shot: the few-shot bank (zero-shot prompts while it is empty), or ``None``.
        blocks: the visual blocks (1-indexed) whose residual-stream tokens mutual scoring compares.
        images: the batch.
    """
    bank_taps = few_shot.taps if few_shot is not None and few_shot.active else ()
    mutual_taps = tuple(Tap(block, TokenPath.RESIDUAL) for block in blocks)
    features = visual_encoder.encode(images, bank_taps + mutual_taps, class_embedding=True)
    bank, mutual = features.extra_tokens[: len(bank_taps)], features.extra_tokens[len(bank_taps) :]
    size = (images.shape[-2], images.shape[-1])
    grid = visual_encoder.grid_size(size)
    prompt = score_features(
        features.global_embedding, features.patch_tokens, grid, size, smoothing, text_features, few_shot, bank
    )
    anomaly_map = prompt.anomaly_map if bank_taps else prompt.anomaly_map / len(features.patch_tokens)
    pool_tokens = torch.stack([layer.half() for layer in mutual], dim=1)
    return EncodedBatch(prompt.pred_score, anomaly_map, pool_tokens, features.class_embedding)


class PoolMemberInferenceModel(nn.Module):
    """What an exported graph of a mutual-scoring model computes: :func:`encode_pool_member` with fixed prompts.

    The pool is scored outside the graph (:mod:`anomalib_anomalyclip.integration.pool_scoring`), from the graph's
    outputs (the fields of :class:`EncodedBatch`).

    Args:
        visual_encoder: the dual-path visual encoder (shared, not copied).
        text_features: (1, 2, D) normalised text features of the fixed prompts (a constant of the graph).
        smoothing: the Gaussian smoothing (shared, not copied).
        few_shot: the few-shot memory bank (a constant of the graph), or ``None``.
        mutual: the mutual-scoring settings (their ``blocks`` are read in the graph; the rest is applied outside).
    """

    def __init__(
        self,
        visual_encoder: DualPathVisualEncoder,
        text_features: torch.Tensor,
        smoothing: GaussianSmoothing,
        few_shot: FewShotScorer | None,
        mutual: MutualScoring,
    ) -> None:
        super().__init__()
        self.visual_encoder = visual_encoder
        self.smoothing = smoothing
        self.few_shot = few_shot
        self.mutual = mutual
        self.register_buffer("text_features", text_features.detach().clone())

    @property
    def patch_size(self) -> int:
        """Side of a square patch of the visual transformer, in pixels."""
        return int(self.visual_encoder.patch_size[0])

    def forward(self, images: torch.Tensor) -> EncodedBatch:
        """Encode a batch of CLIP-normalised images (B, 3, H, W) for mutual scoring."""
        return encode_pool_member(
            self.visual_encoder, self.smoothing, self.text_features, self.few_shot, self.mutual.blocks, images
        )


class PooledModel:
    """Mutual scoring for the torch model: ``mutual`` is ``None`` (off) until :meth:`use_mutual_scoring`."""

    mutual: MutualScoring | None = None

    def use_mutual_scoring(self, config: MutualScoring) -> None:
        """Score images against the other images of their pool too (see :mod:`.mutual`); its blocks must exist.

        Raises:
            MutualScoringError: a block of ``config`` is not one of the visual transformer's.
        """
        try:
            check_layers(config.blocks, self.visual_encoder.depth, "mutual.blocks")
        except ValueError as error:
            raise MutualScoringError(f"{error} Choose blocks of this backbone, e.g. the last one.") from None
        self.mutual = config

    def encode_pool_member(self, images: torch.Tensor) -> EncodedBatch:
        """One encoder pass over CLIP-normalised ``images`` (B, 3, H, W): the prompts' outputs and mutual tokens."""
        config = self._mutual_config()
        with torch.no_grad():
            text_features = self.inference_text_features()
            return encode_pool_member(
                self.visual_encoder, self.smoothing, text_features, self.few_shot, config.blocks, images
            )

    def pool_inference_model(self) -> PoolMemberInferenceModel:
        """:meth:`encode_pool_member` alone, with the current prompts as constants (what is exported)."""
        text_features = self.inference_text_features()
        return PoolMemberInferenceModel(
            self.visual_encoder, text_features, self.smoothing, self.few_shot, self._mutual_config()
        )

    def pool_fingerprint(self) -> dict[str, Any]:
        """What the pool members' encodings depend on: prompts, CLIP weights, configuration, smoothing."""
        text_features = self.inference_text_features().detach().float().cpu().contiguous()
        patch_embedding = next(self.visual_encoder.parameters()).detach().float().cpu().contiguous()
        return {
            "prompts": hashlib.sha256(text_features.numpy().tobytes()).hexdigest(),
            "clip": hashlib.sha256(patch_embedding.numpy().tobytes()).hexdigest(),
            "model": self.describe(),
            "smoothing": repr(self.smoothing),
        }

    def token_grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """Patch grid (rows, columns) of the tokens of images of ``size`` (height, width)."""
        return self.visual_encoder.grid_size(size)

    def score_pool(self, members: Sequence[EncodedBatch]) -> InferenceBatch:
        """Scores and maps of a pool of images, each scored against the others and fused with the prompts.

        Args:
            members: the pool, batches as :meth:`encode_pool_member` encoded them (in a fixed order, e.g. sorted
                paths); the mutual scores are fused with the prompts' as :attr:`mutual` says (``fusion``). All of it
                is held at once: :mod:`anomalib_anomalyclip.integration.pool_scoring` streams large pools subset by
                subset to the same scores.

        Returns:
            ``pred_score`` (N,) and ``anomaly_map`` (N, 1, H, W) in [0, 1], in the order of ``members``.
        """
        config = self._mutual_config()
        device = self.text_features.device  # members may wait in CPU memory; the model's device scores them
        tokens = [torch.cat(layer).to(device) for layer in zip(*(member.tokens for member in members), strict=True)]
        prompt_maps = torch.cat([member.anomaly_map for member in members]).to(device)
        size = (int(prompt_maps.shape[-2]), int(prompt_maps.shape[-1]))
        embeddings = torch.cat([member.class_embedding for member in members]).to(device)
        scores, maps = score_mutually(tokens, self.token_grid(size), size, config, embeddings)
        prompt_scores = torch.cat([member.pred_score for member in members]).to(device)
        fused_scores, fused_maps = fuse_with_prompts(prompt_scores, prompt_maps, scores, maps, config.fusion)
        return InferenceBatch(pred_score=fused_scores, anomaly_map=fused_maps)

    def _mutual_config(self) -> MutualScoring:
        if self.mutual is None:
            raise RuntimeError("This model does no mutual scoring; give it a configuration with use_mutual_scoring().")
        return self.mutual

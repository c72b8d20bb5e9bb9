"""Mutual scoring in the torch model: a pool's images encoded once, then scored against each other (:mod:`.mutual`).

:class:`PooledModel` is mixed into :class:`~anomalib_anomalyclip.method.torch_model.AnomalyCLIPModel`, as
:class:`~anomalib_anomalyclip.method.tiled_model.TiledModel` is; a run's pools are planned, streamed and stored by
:mod:`anomalib_anomalyclip.integration.pool_scoring`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from anomalib.data import InferenceBatch

from anomalib_anomalyclip.method.dpam import Tap, TokenPath, check_layers
from anomalib_anomalyclip.method.mutual import MutualScoring, MutualScoringError, fuse_with_prompts
from anomalib_anomalyclip.method.mutual import score_pool as score_mutually

__all__ = ["EncodedBatch", "PooledModel"]


class EncodedBatch(NamedTuple):
    """A batch of images encoded once for mutual scoring: the prompts' scores and maps, and what mutual scoring needs.

    Attributes:
        pred_score: (B,) image scores of the prompts (zero-shot, or fused with the few-shot bank).
        anomaly_map: (B, 1, H, W) maps of the prompts, on [0, 1] (zero-shot maps divided by the layer count).
        tokens: per mutual-scoring block, (B, L, C) raw residual-stream patch tokens in float16.
        class_embedding: (B, D) CLIP's image embeddings (for RsCIN).
    """

    pred_score: torch.Tensor
    anomaly_map: torch.Tensor
    tokens: list[torch.Tensor]
    class_embedding: torch.Tensor


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
        bank_taps = self.few_shot.taps if self.has_references else ()
        mutual_taps = tuple(Tap(block, TokenPath.RESIDUAL) for block in config.blocks)
        features = self.encode(images, bank_taps + mutual_taps, class_embedding=True)
        bank, mutual = features.extra_tokens[: len(bank_taps)], features.extra_tokens[len(bank_taps) :]
        prompt = self.scores_from_features(
            features.global_embedding, features.patch_tokens, images.shape[-2:], self.few_shot, bank
        )
        anomaly_map = prompt.anomaly_map if self.has_references else prompt.anomaly_map / len(self.feature_layers)
        return EncodedBatch(
            prompt.pred_score, anomaly_map, [layer.half() for layer in mutual], features.class_embedding
        )

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
        scores, maps = score_mutually(tokens, self.visual_encoder.grid_size(size), size, config, embeddings)
        prompt_scores = torch.cat([member.pred_score for member in members]).to(device)
        fused_scores, fused_maps = fuse_with_prompts(prompt_scores, prompt_maps, scores, maps, config.fusion)
        return InferenceBatch(pred_score=fused_scores, anomaly_map=fused_maps)

    def _mutual_config(self) -> MutualScoring:
        if self.mutual is None:
            raise RuntimeError("This model does no mutual scoring; give it a configuration with use_mutual_scoring().")
        return self.mutual

"""PyTorch model of AnomalyCLIP: normalised images in, image scores and anomaly maps out.

The pieces live in their own modules: CLIP loading (:mod:`.backbone`), the dual-path visual forward (:mod:`.dpam`),
the prompts and text encoder (:mod:`.prompts`), the scores and maps (:mod:`.scoring`), the few-shot bank
(:mod:`.few_shot`), mutual scoring (:mod:`.mutual`) and tiling (:mod:`.tiled_model`). This module composes them.

Example:
    >>> import torch
    >>> from anomalib_anomalyclip.method.torch_model import AnomalyCLIPModel
    >>> model = AnomalyCLIPModel(pretrained="/models/ViT-L-14-336px.pt",
    ...                          prompt_weights="/models/anomalyclip_visa.pth")  # doctest: +SKIP
    >>> batch = model.eval()(torch.randn(2, 3, 518, 518))  # doctest: +SKIP
    >>> batch.pred_score.shape, batch.anomaly_map.shape  # doctest: +SKIP
    (torch.Size([2]), torch.Size([2, 1, 518, 518]))
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from anomalib.data import InferenceBatch
from torch import nn

from anomalib_anomalyclip.errors import parse_choice
from anomalib_anomalyclip.method.backbone import load_clip
from anomalib_anomalyclip.method.dpam import (
    DpamKind,
    DualPathVisualEncoder,
    Tap,
    VisualFeatures,
    check_layers,
)
from anomalib_anomalyclip.method.few_shot import (
    FewShotFusion,
    FewShotScorer,
    FewShotSettings,
    few_shot_settings,
    score_leaving_out,
)
from anomalib_anomalyclip.method.inference_model import AnomalyCLIPInferenceModel, score_batch, score_features
from anomalib_anomalyclip.method.mutual import MutualScoring
from anomalib_anomalyclip.method.pooled_model import PooledModel, PoolMemberInferenceModel
from anomalib_anomalyclip.method.prompts import (
    AGNOSTIC_OBJECT,
    PromptConfig,
    PromptLearner,
    PromptTextEncoder,
    PromptType,
    save_prompts,
)
from anomalib_anomalyclip.method.scoring import GaussianSmoothing, patch_probability_maps, similarity_logits
from anomalib_anomalyclip.method.tiled_model import TiledModel, check_tiled_export
from anomalib_anomalyclip.weights import resolve_prompt_weights

if TYPE_CHECKING:
    from anomalib_anomalyclip.config import AnomalyCLIPConfig


class TrainingOutput(NamedTuple):
    """What the loss needs from one training forward.

    Attributes:
        image_logits: (B, 2) cosine similarities / temperature of the global embedding.
        layer_probabilities: per feature layer, (B, 2, H, W) up-sampled probabilities.
    """

    image_logits: torch.Tensor
    layer_probabilities: list[torch.Tensor]


class AnomalyCLIPModel(PooledModel, TiledModel, nn.Module):
    """AnomalyCLIP on a frozen open_clip CLIP (tiling and pools: :mod:`.tiled_model`, :mod:`.pooled_model`).

    Args:
        backbone: open_clip model name.
        pretrained: open_clip tag (``"openai"``), a local CLIP checkpoint file, or ``None``
            for random weights (tests and timing only).
        image_size: side of the square input the model is used at (518 in the paper).
        prompt_weights: prompt checkpoint to load (ours or the reference's released
            format), or ``None`` to start from untrained prompts.
        dpam_kind: ``vv`` (default), ``qq``, ``kk`` or ``none``.
        dpam_start_layer: first visual block (1-indexed) with the DPAM path.
        feature_layers: visual blocks whose patch tokens make the maps; ``None`` means
            the last block (the released code); ``(6, 12, 18, 24)`` is the paper's text.
        n_ctx: learnable context vectors per prompt.
        text_token_depth: learnable text-encoder tokens go into text blocks 2..depth.
        text_token_length: number of learnable tokens per text block.
        text_tokens: whether the text-encoder tokens are used.
        prompt_type: ``object_agnostic`` (the method) or ``object_aware`` (ablation).
        class_name: object name used by object-aware prompts at inference.
        smoothing_sigma: Gaussian sigma of the map smoothing in pixels (0: none).
        prompt_seed: seed of the prompts' random initialisation (111 as the reference;
            ``None``: torch's global generator).
        cache_dir: open_clip download cache.
        few_shot: settings of the few-shot memory bank (:func:`.few_shot.few_shot_settings`); ``None``
            or ``k_shot=0``: zero-shot. The bank is filled by :meth:`remember_references`.
    """

    def __init__(
        self,
        backbone: str = "ViT-L-14-336",
        pretrained: str | Path | None = "openai",
        image_size: int = 518,
        prompt_weights: str | Path | None = None,
        dpam_kind: DpamKind | str = DpamKind.VV,
        dpam_start_layer: int = 6,
        feature_layers: Sequence[int] | None = None,
        n_ctx: int = 12,
        text_token_depth: int = 9,
        text_token_length: int = 4,
        text_tokens: bool = True,
        prompt_type: PromptType | str = PromptType.OBJECT_AGNOSTIC,
        class_name: str = AGNOSTIC_OBJECT,
        smoothing_sigma: float = 4.0,
        prompt_seed: int | None = 111,
        cache_dir: str | None = None,
        few_shot: FewShotSettings | None = None,
    ) -> None:
        super().__init__()
        clip = load_clip(backbone, pretrained, cache_dir=cache_dir)
        self.image_size = image_size
        self.class_name = class_name
        self.visual_encoder = DualPathVisualEncoder(clip.visual, dpam_kind, dpam_start_layer, feature_layers)
        config = PromptConfig(
            width=clip.ln_final.weight.shape[0],
            n_ctx=n_ctx,
            text_token_depth=text_token_depth,
            text_token_length=text_token_length,
            text_tokens=text_tokens,
            prompt_type=PromptType(prompt_type),
        )
        generator = None if prompt_seed is None else torch.Generator().manual_seed(prompt_seed)
        self.prompt_learner = PromptLearner(config, generator)
        self.text_encoder = PromptTextEncoder(clip, config)
        self.smoothing = GaussianSmoothing(smoothing_sigma)
        self.few_shot: FewShotScorer | None = None
        self.few_shot_settings: FewShotSettings | None = None
        self.mutual: MutualScoring | None = None
        if few_shot is not None and few_shot.k_shot:
            self.use_few_shot(few_shot)
        self.register_buffer("text_features", torch.zeros(1, 2, clip.text_projection.shape[1]), persistent=False)
        self._text_features_key: tuple | None = None
        if prompt_weights is not None:
            self.prompt_learner.load_checkpoint(prompt_weights)

    @classmethod
    def from_config(cls, config: AnomalyCLIPConfig) -> AnomalyCLIPModel:
        """The torch model of a Lightning model's configuration: prompts, DPAM, few-shot bank, mutual scoring, tiling.

        Raises:
            AnomalyCLIPError: a setting that does not fit the backbone (e.g. a block it does not have).
        """
        prompts, dpam = config.prompts, config.dpam
        model = cls(
            backbone=config.backbone,
            pretrained=config.pretrained,
            image_size=config.image_size,
            prompt_weights=resolve_prompt_weights(config.prompt_weights),
            dpam_kind=parse_choice(DpamKind, dpam.kind, "dpam.kind"),
            dpam_start_layer=dpam.start_layer,
            feature_layers=dpam.feature_layers,
            n_ctx=prompts.n_ctx,
            text_token_depth=prompts.text_token_depth,
            text_token_length=prompts.text_token_length,
            text_tokens=prompts.text_tokens,
            prompt_type=parse_choice(PromptType, prompts.type, "prompts.type"),
            class_name=prompts.class_name or AGNOSTIC_OBJECT,
            smoothing_sigma=dpam.smoothing_sigma,
            prompt_seed=prompts.seed,
            cache_dir=config.cache_dir,
        )
        if config.k_shot:
            few_shot = config.few_shot
            layers = few_shot.layers
            model.use_few_shot(
                few_shot_settings(config.k_shot, layers, few_shot.tokens, few_shot.fusion, model.feature_layers)
            )
        if config.mutual.enabled:
            model.use_mutual_scoring(config.mutual)
        model.configure_tiling(config.tiling)
        return model

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """Visual blocks (1-indexed) whose patch tokens make the anomaly map."""
        return self.visual_encoder.feature_layers

    @property
    def k_shot(self) -> int:
        """Number of few-shot references (0: zero-shot)."""
        return self.few_shot_settings.k_shot if self.few_shot_settings is not None else 0

    @property
    def has_references(self) -> bool:
        """Whether the few-shot bank holds references."""
        return self.few_shot is not None and self.few_shot.active

    @property
    def map_scale(self) -> float:
        """Largest map value: 1 when maps are fused (few-shot, mutual scoring), else the number of feature layers."""
        return 1.0 if self.k_shot or self.mutual else float(len(self.feature_layers))

    @property
    def uses_class_names(self) -> bool:
        """Whether the prompts put an object name into the sentences (object-aware prompts)."""
        return self.prompt_learner.config.prompt_type is not PromptType.OBJECT_AGNOSTIC

    def prompt_parameters(self) -> list[nn.Parameter]:
        """The learnable prompts: the only parameters that training changes."""
        return list(self.prompt_learner.parameters())

    def load_prompts(self, path: str | Path) -> None:
        """Load prompts from a prompt file (ours, the reference's, or a Lightning checkpoint of this model)."""
        self.prompt_learner.load_checkpoint(path)

    def load_prompt_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load prompt tensors (``ctx_pos``, ...) read from ``source`` (named in errors)."""
        self.prompt_learner.load_prompt_state(state, source=source)

    def use_few_shot(self, settings: FewShotSettings) -> None:
        """Give the model an empty few-shot bank with ``settings`` (its layers must exist in the backbone)."""
        self.few_shot = self.new_few_shot_scorer(settings.taps, settings.fusion)
        self.few_shot_settings = settings

    def describe(self) -> dict[str, Any]:
        """What a checkpoint records of the model's configuration (see :mod:`.checkpoints`)."""
        info: dict[str, Any] = {
            "feature_layers": list(self.feature_layers),
            "dpam_kind": self.visual_encoder.dpam_kind.value,
            "image_size": self.image_size,
        }
        if self.few_shot_settings is not None:
            settings = self.few_shot_settings
            info["few_shot"] = {
                "k_shot": settings.k_shot,
                "layers": list(settings.layers),
                "tokens": settings.tokens.value,
                "fusion": settings.fusion.value,
            }
        return info

    def describe_bank(self) -> str:
        """Shape and size of the few-shot bank, for the log."""
        if self.few_shot is None:
            return "no few-shot bank"
        shape = "x".join(str(size) for size in self.few_shot.memory.shape)
        return f"memory bank {shape}, {self.few_shot.memory_bytes / 1e6:.1f} MB"

    def encode_text(self, class_names: Sequence[str] | None = None) -> torch.Tensor:
        """Normalised text features (C, 2, D) of the current prompts, with gradients.

        Args:
            class_names: one pair of features per name; ``None`` uses ``class_name``.
        """
        return self.text_encoder(self.prompt_learner, class_names or (self.class_name,))

    def inference_text_features(self) -> torch.Tensor:
        """Text features for inference, recomputed only when the prompts changed.

        The result is kept in the ``text_features`` buffer, so that an exported graph
        holds the two text embeddings as constants and no text encoder.
        """
        if torch.compiler.is_compiling():
            return self.text_features
        key = (self.class_name, *(parameter._version for parameter in self.prompt_learner.parameters()))
        key = (*key, *(id(parameter) for parameter in self.prompt_learner.parameters()))
        if key != self._text_features_key:
            with torch.no_grad():
                self.text_features = self.encode_text().detach()
            self._text_features_key = key
        return self.text_features

    def forward(
        self, images: torch.Tensor, class_names: Sequence[str] | None = None
    ) -> InferenceBatch | TrainingOutput:
        """Score a batch of CLIP-normalised images (B, 3, H, W).

        Args:
            images: the batch.
            class_names: per-image object names for object-aware prompts (training);
                ignored by object-agnostic prompts.

        Returns:
            In training mode the :class:`TrainingOutput` for the loss; in eval mode an
            ``InferenceBatch`` with ``pred_score`` (B,) and ``anomaly_map`` (B, 1, H, W).
        """
        if self.training:
            return self.training_outputs(images, class_names)
        return self.score(images)

    def score(self, images: torch.Tensor) -> InferenceBatch:
        """Scores (B,) and maps (B, 1, H, W) of CLIP-normalised images (B, 3, H, W): tiled or not, zero- or few-shot."""
        with torch.no_grad():
            text_features = self.inference_text_features()
            return score_batch(self.visual_encoder, self.smoothing, images, text_features, self.few_shot, self.tiling)

    def scores_from_features(
        self,
        global_embedding: torch.Tensor,
        patch_tokens: Sequence[torch.Tensor],
        size: Sequence[int],
        few_shot: FewShotScorer | None = None,
        bank_tokens: Sequence[torch.Tensor] = (),
    ) -> InferenceBatch:
        """What ``forward`` returns in eval mode, from already computed visual features (e.g. a feature cache).

        Args:
            global_embedding: (B, D) global embeddings.
            patch_tokens: per feature layer, (B, N, D) patch tokens.
            size: (H, W) of the images the features come from.
            few_shot: a filled few-shot bank to score with (e.g. :meth:`new_few_shot_scorer`); ``None``: zero-shot.
            bank_tokens: per tap of ``few_shot``, (B, N, D) patch tokens.
        """
        size = (int(size[0]), int(size[1]))
        grid = self.visual_encoder.grid_size(size)
        text_features = self.inference_text_features()
        return score_features(
            global_embedding, patch_tokens, grid, size, self.smoothing, text_features, few_shot, bank_tokens
        )

    @property
    def feature_taps(self) -> tuple[Tap, ...]:
        """Where the anomaly maps read patch tokens: one tap per feature layer."""
        return self.visual_encoder.feature_taps

    def encode(
        self, images: torch.Tensor, extra_taps: Sequence[Tap] = (), class_embedding: bool = False
    ) -> VisualFeatures:
        """Visual features of CLIP-normalised images (B, 3, H, W) in one pass without gradients.

        Args:
            images: the batch.
            extra_taps: further taps read in the same pass (e.g. a few-shot bank's).
            class_embedding: also CLIP's own image embedding (mutual scoring's RsCIN).
        """
        with torch.no_grad():
            return self.visual_encoder.encode(images, extra_taps, class_embedding)

    def new_few_shot_scorer(self, taps: Sequence[Tap], fusion: FewShotFusion | str) -> FewShotScorer:
        """An empty few-shot bank reading ``taps`` of this model's encoder (``remember`` fills it)."""
        check_layers([layer for layer, _ in taps], self.visual_encoder.depth, "few_shot.layers")
        return FewShotScorer(taps, fusion, self.visual_encoder.output_dim).to(self.text_features.device)

    def save_prompts(self, path: str | Path) -> Path:
        """Save the prompts as a prompt file (usable as ``prompt_weights``); returns ``path``."""
        return save_prompts(self.prompt_learner, path)

    def inference_model(
        self, fixed_size: Sequence[int] | None = None, traced: bool = False
    ) -> AnomalyCLIPInferenceModel | PoolMemberInferenceModel:
        """The inference path alone: visual encoder, current text features as constants, smoothing.

        Shares the visual encoder and smoothing with this model; holds no prompts and no
        text encoder. This is what gets exported. With mutual scoring, the encoding of each pool member
        (:meth:`pool_inference_model`): the pool is scored outside.

        Args:
            fixed_size: the (height, width) a traced graph takes, if fixed.
            traced: the model is for a traced graph, where tiling needs a fixed working size
                (:func:`.tiled_model.check_tiled_export`).
        """
        if self.mutual is not None:
            return self.pool_inference_model()
        text_features = self.inference_text_features()
        tiling = check_tiled_export(self.tiling, fixed_size) if traced else self.tiling
        return AnomalyCLIPInferenceModel(self.visual_encoder, text_features, self.smoothing, self.few_shot, tiling)

    def use_class_name(self, name: str) -> None:
        """Put ``name`` into object-aware prompts from now on (object-agnostic prompts ignore it)."""
        self.class_name = name

    def remember_references(self, images: torch.Tensor, batch_size: int = 8) -> InferenceBatch | None:
        """Fill the few-shot bank with the patch tokens of normal reference images.

        Args:
            images: (k, 3, H, W) CLIP-normalised reference images.
            batch_size: references encoded at once.

        Returns:
            With two or more references, each reference scored against the bank of the
            others (leave-one-out): scores and maps of normal images, for thresholds.
            ``None`` with a single reference.
        """
        if self.few_shot is None:
            raise RuntimeError("This model has no few-shot bank; give it one with use_few_shot().")
        if self.tiling is not None:
            return self.remember_tiled_references(images)
        features = VisualFeatures.cat([self.encode(chunk, self.few_shot.taps) for chunk in images.split(batch_size)])
        self.few_shot.remember(features.extra_tokens)
        if images.shape[0] < 2:
            return None
        return self._leave_one_out(features, images.shape[-2:])

    def _leave_one_out(self, features: VisualFeatures, size: Sequence[int]) -> InferenceBatch:
        def score_one(index: int, scorer: FewShotScorer) -> InferenceBatch:
            one = features.select(slice(index, index + 1))
            return self.scores_from_features(one.global_embedding, one.patch_tokens, size, scorer, one.extra_tokens)

        return score_leaving_out(self.few_shot, features.global_embedding.shape[0], score_one)

    def training_outputs(self, images: torch.Tensor, class_names: Sequence[str] | None = None) -> TrainingOutput:
        """Image logits and per-layer probability maps, differentiable w.r.t. the prompts."""
        with torch.no_grad():
            global_embedding, patch_tokens = self.visual_encoder(images)
        return self.outputs_from_features(global_embedding, patch_tokens, images.shape[-2:], class_names)

    def outputs_from_features(
        self,
        global_embedding: torch.Tensor,
        patch_tokens: Sequence[torch.Tensor],
        size: Sequence[int],
        class_names: Sequence[str] | None = None,
    ) -> TrainingOutput:
        """Training outputs from already computed visual features (e.g. a feature cache).

        Args:
            global_embedding: (B, D) global embeddings.
            patch_tokens: per feature layer, (B, N, D) patch tokens.
            size: (H, W) of the images the features come from.
            class_names: per-image names for object-aware prompts.
        """
        text_features = self._training_text_features(class_names, global_embedding.shape[0])
        size = (int(size[0]), int(size[1]))
        grid = self.visual_encoder.grid_size(size)
        logits = similarity_logits(global_embedding.unsqueeze(1), text_features)[:, 0]
        maps = [patch_probability_maps(tokens, text_features, grid, size) for tokens in patch_tokens]
        return TrainingOutput(image_logits=logits, layer_probabilities=maps)

    def _training_text_features(self, class_names: Sequence[str] | None, batch_size: int) -> torch.Tensor:
        if not self.uses_class_names or not class_names:
            return self.encode_text()
        unique = sorted(set(class_names))
        features = self.encode_text(unique)
        if len(class_names) != batch_size:
            raise ValueError(f"Got {len(class_names)} class names for a batch of {batch_size} images.")
        return features[[unique.index(name) for name in class_names]]

"""AnomalyCLIP as an anomalib model: ``anomalib train|fit|test|predict --model AnomalyCLIP``.

Two ways to use it:

* **Zero-shot** (the usual case): give prompts with ``prompt_weights`` (a file, an
  http(s) URL, or the short name of a released checkpoint such as
  ``anomalyclip-mvtec``). The model is then a zero-shot model for anomalib's Engine:
  ``train``/``fit`` only collect normalisation statistics and thresholds, ``test`` and
  ``predict`` score the target data.
* **Few-shot** (``k_shot > 0``): ``k_shot`` normal images of the product (the
  datamodule's train split, or ``few_shot_source``) fill a memory bank of patch tokens
  whose nearest-neighbour distances join the zero-shot map (see :mod:`.few_shot`).
  anomalib's Engine treats the model as FEW_SHOT: ``train``/``fit`` collect the
  references and thresholds, with no gradient step, and save a checkpoint with the bank.
* **Prompt training** (the paper's protocol): without ``prompt_weights`` the prompts
  are learned by ``fit`` on labelled normal and anomalous images, e.g.
  :class:`anomalib_anomalyclip.data.AuxiliaryDataModule` over every category of MVTec
  AD's test split. Only the prompts are trained and stored in the checkpoint; the CLIP
  weights stay frozen and are loaded from ``pretrained``.

Without ``prompt_weights``, when there is nothing to learn prompts from (the fit data
holds normal images only, or there is no fit), the model takes the authors' released
prompts trained on the other dataset (see :func:`.weights.released_prompts_for`).

Example:
    >>> from anomalib.engine import Engine
    >>> from anomalib.data import Visa
    >>> from anomalib_anomalyclip import AnomalyCLIP
    >>> model = AnomalyCLIP(prompt_weights="anomalyclip-mvtec")  # doctest: +SKIP
    >>> Engine().test(model, datamodule=Visa(category="candle"))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import AnomalibDataModule, Batch
from anomalib.deploy.export import CompressionType
from anomalib.metrics import AUPR, AUPRO, AUROC, Evaluator, F1Max
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import ImageVisualizer, Visualizer
from lightning.pytorch import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import nn
from torchvision.transforms.v2 import Compose, InterpolationMode, Normalize, Resize

from . import expose_in_anomalib
from .callbacks import ConvertingImageVisualizer, model_callbacks
from .checkpoints import CheckedCheckpointLoading
from .data import has_pixel_mask
from .data.references import ReferenceSource, datamodule_references, folder_references, load_references
from .dpam import DpamKind, TokenPath
from .errors import explain_setup_errors
from .export import EXPORT_OPSET, check_openvino_export, inference_model_in_place
from .feature_cache import (
    FeatureCache,
    check_storage_dtype,
    training_feature_cache,
    validation_feature_cache,
    visual_features,
)
from .few_shot import FewShotFusion, FewShotSettings, choose_references, few_shot_settings
from .loss import GlocalLoss, LossVariant
from .metrics import PaperAUPRO
from .post_processor import DEFAULT_NORMAL_QUANTILE, ProbabilityPostProcessor, check_quantile
from .pre_processor import AnomalyCLIPPreProcessor, Preprocessing, check_preprocessing
from .prompts import AGNOSTIC_OBJECT, PromptCheckpointError, PromptType, prompts_of_lightning_checkpoint
from .torch_model import AnomalyCLIPModel
from .weights import released_prompts_for, resolve_prompt_weights

logger = logging.getLogger(__name__)

__all__ = ["AnomalyCLIP", "ProbabilityPostProcessor", "PromptsUnavailableError"]

CLIP_MEAN = OPENAI_DATASET_MEAN  # the normalisation CLIP (OpenAI weights) was trained with
CLIP_STD = OPENAI_DATASET_STD
CHECKPOINT_INFO_KEY = "anomalyclip"
FROZEN_PREFIXES = ("model.visual_encoder.", "model.text_encoder.")  # the frozen CLIP: never stored in checkpoints


class PromptsUnavailableError(RuntimeError):
    """The model would score images with prompts that were never trained or loaded."""


class AnomalyCLIP(CheckedCheckpointLoading, AnomalibModule):
    """AnomalyCLIP: object-agnostic prompt learning for zero-shot anomaly detection.

    Args:
        backbone: open_clip model name of the frozen CLIP.
        pretrained: open_clip tag (``"openai"``) or a local CLIP checkpoint file.
        image_size: side of the square input (images are resized to it, bicubic).
        prompt_weights: prompts for zero-shot use: a file (ours or the reference's
            released ``epoch_15.pth``), an http(s) URL, or a released short name
            (``anomalyclip-mvtec``: trained on MVTec AD; ``anomalyclip-visa``: trained on
            VisA). ``None``: the prompts start untrained and are learned by ``fit``.
        train_prompts: learn the prompts in ``fit``. ``None`` means: learn them when no
            ``prompt_weights`` are given. ``True`` with ``prompt_weights`` fine-tunes.
        dpam_kind: ``vv`` (default), ``qq``, ``kk`` or ``none`` (no DPAM, an ablation).
        dpam_start_layer: first visual block (1-indexed) with the DPAM path.
        feature_layers: visual blocks whose patch tokens make the maps; ``None``: the
            last block, as in the released code. ``[6, 12, 18, 24]``: the paper's text.
        n_ctx: learnable context vectors per prompt.
        text_token_depth: learnable text-encoder tokens go into text blocks 2..depth.
        text_token_length: learnable tokens per text block.
        text_tokens: use the text-encoder tokens (an ablation switches them off).
        prompt_type: ``object_agnostic`` (the method) or ``object_aware`` (ablation).
        class_name: object name for object-aware prompts; ``None`` takes the
            datamodule's category.
        smoothing_sigma: Gaussian smoothing of the map in pixels (0: off).
        lr: Adam learning rate of the prompts.
        betas: Adam betas.
        loss: ``glocal`` (default), ``global`` (image loss only) or ``local`` (maps only).
        local_loss_weight: weight of the focal + dice map losses.
        epochs: training epochs of the prompts (sets the trainer's ``max_epochs``).
        seed: seed of the prompts' initialisation (anomalib's CLI does not apply
            ``--seed_everything``; the auxiliary datamodule's ``seed`` fixes the batch order).
        cache_dir: open_clip's download cache for ``pretrained`` tags.
        feature_cache: compute the frozen visual features of each training image once and
            reuse them in later epochs (see :mod:`anomalib_anomalyclip.feature_cache`).
            Switched off automatically for randomly augmented training images.
        feature_cache_dir: folder for a persistent, memory-mapped feature cache that later
            runs with the same features reuse. ``None``: in memory when it fits, else in a
            temporary folder below the trainer's ``default_root_dir``.
        feature_cache_dtype: storage precision of the cache: ``float32`` (the features exactly
            as computed) or ``float16`` (half the size, slightly different prompts).
        k_shot: number of normal reference images for the few-shot memory bank; 0:
            zero-shot. Taken from the datamodule's train split unless ``few_shot_source``.
        few_shot_source: a folder of normal reference images (instead of the train split).
        few_shot_layers: visual blocks of the memory bank; ``None``: the feature layers.
        few_shot_tokens: ``dpam`` (the tokens that make the zero-shot maps, no extra cost)
            or ``original`` (the ordinary attention stream of the same blocks).
        few_shot_fusion: ``mean`` (default), ``harmonic`` or ``few_shot`` (the few-shot map
            alone); see :mod:`anomalib_anomalyclip.few_shot`.
        normal_quantile: when validation sees only normal images (or the references,
            scored leave-one-out), the thresholds are this quantile of their scores:
            ``1 - normal_quantile`` is the accepted false-alarm rate.
        preprocessing: ``reference`` (default): each image resized on its own as the reference
            implementation does (8-bit PIL bicubic, masks bilinear > 0.5; also in exported graphs);
            ``fast``: anomalib's float resize (masks nearest). See :mod:`.pre_processor`.
        pre_processor: anomalib pre-processor, or ``True`` for resize + CLIP normalisation as
            ``preprocessing`` says.
        post_processor: anomalib post-processor, or ``True`` for the default.
        evaluator: anomalib evaluator, or ``True`` for image AUROC/AP/F1-max and pixel
            AUROC/AUPRO/F1-max.
        visualizer: anomalib visualizer, or ``True`` for the default.
    """

    @explain_setup_errors
    def __init__(
        self,
        backbone: str = "ViT-L-14-336",
        pretrained: str | None = "openai",
        image_size: int = 518,
        prompt_weights: str | None = None,
        train_prompts: bool | None = None,
        dpam_kind: str = DpamKind.VV.value,
        dpam_start_layer: int = 6,
        feature_layers: Sequence[int] | None = None,
        n_ctx: int = 12,
        text_token_depth: int = 9,
        text_token_length: int = 4,
        text_tokens: bool = True,
        prompt_type: str = PromptType.OBJECT_AGNOSTIC.value,
        class_name: str | None = None,
        smoothing_sigma: float = 4.0,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.5, 0.999),
        loss: str = LossVariant.GLOCAL.value,
        local_loss_weight: float = 4.0,
        epochs: int = 15,
        seed: int | None = 111,
        cache_dir: str | None = None,
        feature_cache: bool = True,
        feature_cache_dir: str | None = None,
        feature_cache_dtype: str = "float32",
        k_shot: int = 0,
        few_shot_source: str | None = None,
        few_shot_layers: Sequence[int] | None = None,
        few_shot_tokens: str = TokenPath.DPAM.value,
        few_shot_fusion: str = FewShotFusion.MEAN.value,
        normal_quantile: float = DEFAULT_NORMAL_QUANTILE,
        preprocessing: str = Preprocessing.REFERENCE.value,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        check_storage_dtype(feature_cache_dtype)
        if pre_processor is True:
            pre_processor = self.configure_pre_processor((image_size, image_size), preprocessing)
        if post_processor is True:
            post_processor = ProbabilityPostProcessor(check_quantile(normal_quantile))
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        weights_file = resolve_prompt_weights(prompt_weights)
        self.model = AnomalyCLIPModel(
            backbone=backbone,
            pretrained=pretrained,
            image_size=image_size,
            prompt_weights=weights_file,
            dpam_kind=dpam_kind,
            dpam_start_layer=dpam_start_layer,
            feature_layers=feature_layers,
            n_ctx=n_ctx,
            text_token_depth=text_token_depth,
            text_token_length=text_token_length,
            text_tokens=text_tokens,
            prompt_type=prompt_type,
            class_name=class_name or AGNOSTIC_OBJECT,
            smoothing_sigma=smoothing_sigma,
            prompt_seed=seed,
            cache_dir=cache_dir,
        )
        self.few_shot_config = few_shot_settings(
            k_shot, few_shot_layers, few_shot_tokens, few_shot_fusion, self.model.feature_layers
        )
        if self.few_shot_config.k_shot:
            self._build_few_shot(self.few_shot_config)
        self.loss = GlocalLoss(loss, local_loss_weight)
        self.class_name = class_name
        # Prompts chosen by the data: none given and not asked to train; released prompts when nothing can teach them.
        self.prompts_chosen_by_data = prompt_weights is None and not train_prompts
        self.learns_prompts = not self.few_shot_config.k_shot and (
            prompt_weights is None if train_prompts is None else train_prompts
        )
        self.prompts_ready = weights_file is not None
        self._feature_cache: FeatureCache | None = None
        self._validation_cache: FeatureCache | None = None
        self._references: list[str] = []
        self._references_restored = False
        self._set_probability_scale()
        # The frozen CLIP is not stored in checkpoints (see on_save_checkpoint).
        self.strict_loading = False

    @classmethod
    def configure_pre_processor(
        cls, image_size: tuple[int, int] | None = None, preprocessing: str = Preprocessing.REFERENCE.value
    ) -> PreProcessor:
        """Resize to the model's input size (bicubic) and normalise with CLIP's statistics.

        Args:
            image_size: (height, width); ``None`` means 518 x 518 as in the paper.
            preprocessing: ``reference`` (:class:`.AnomalyCLIPPreProcessor`) or ``fast`` (anomalib's resize).
        """
        size = image_size or (518, 518)
        if check_preprocessing(preprocessing) is Preprocessing.REFERENCE:
            return AnomalyCLIPPreProcessor(size)
        transform = Compose(
            [
                Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=True),
                Normalize(mean=CLIP_MEAN, std=CLIP_STD),
            ]
        )
        return PreProcessor(transform=transform)

    @staticmethod
    def configure_post_processor() -> PostProcessor:
        """Normalised [0, 1] scores and maps; thresholds from validation data (half of each range until then)."""
        return ProbabilityPostProcessor()

    @staticmethod
    def configure_evaluator() -> Evaluator:
        """Image AUROC, AP and F1-max; pixel AUROC, AUPRO (anomalib's and the paper's) and F1-max."""
        image_fields = ["pred_score", "gt_label"]
        pixel_fields = ["anomaly_map", "gt_mask"]
        test_metrics = [
            AUROC(fields=image_fields, prefix="image_"),
            AUPR(fields=image_fields, prefix="image_"),
            F1Max(fields=image_fields, prefix="image_"),
            AUROC(fields=pixel_fields, prefix="pixel_", strict=False),
            AUPRO(fields=pixel_fields, prefix="pixel_", strict=False),
            PaperAUPRO(fields=pixel_fields, prefix="pixel_", strict=False),
            F1Max(fields=pixel_fields, prefix="pixel_", strict=False),
        ]
        return Evaluator(test_metrics=test_metrics)

    @classmethod
    def configure_visualizer(cls) -> ImageVisualizer:
        """The image visualiser, drawing overlays on the images as this package converts them (16-bit, alpha)."""
        return ConvertingImageVisualizer()

    @property
    def learning_type(self) -> LearningType:
        """``FEW_SHOT`` with k_shot; ``ONE_CLASS`` (anomalib's "needs fitting") to learn prompts; else ``ZERO_SHOT``."""
        if self.few_shot_config.k_shot:
            return LearningType.FEW_SHOT
        return LearningType.ONE_CLASS if self.learns_prompts else LearningType.ZERO_SHOT

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """Epochs of prompt training; nothing for zero-shot use."""
        if not self.learns_prompts:
            return {}
        return {"max_epochs": self.hparams.epochs, "num_sanity_val_steps": 0}

    @classmethod
    def checkpoint_safe_globals(cls) -> Sequence[Any]:
        """Enums that may appear in saved hyper-parameters."""
        return (DpamKind, PromptType, LossVariant)

    def configure_callbacks(self) -> list[Callback]:
        """The components' callbacks, then the input check and the predictions CSV (see :mod:`.callbacks`)."""
        return [*super().configure_callbacks(), *model_callbacks()]

    def configure_optimizers(self) -> torch.optim.Optimizer | None:
        """Adam over the prompt parameters only (about 43 K numbers for ViT-L/14@336)."""
        if not self.learns_prompts:
            return None
        parameters = self.model.prompt_learner.parameters()
        return torch.optim.Adam(parameters, lr=self.hparams.lr, betas=tuple(self.hparams.betas))

    def setup(self, stage: str) -> None:
        """Take the object name from the datamodule's category; choose released prompts for normal-only fit data.

        ``fit`` on normal images only with prompts chosen by the data (the plain ``anomalib
        train --model AnomalyCLIP --data MVTecAD``) has nothing to learn prompts from: the
        released prompts are loaded, and the fit makes one pass over a single batch without a
        gradient step, so that anomalib's validation thresholds and checkpoint follow.
        """
        if getattr(self, "_trainer", None) is None:
            return
        datamodule = self.trainer.datamodule
        category = getattr(datamodule, "category", None)
        if self.class_name is None and isinstance(category, str) and category:
            self.model.class_name = category
        learns_from_data = stage == TrainerFn.FITTING and self.learns_prompts and self.prompts_chosen_by_data
        if learns_from_data and training_data_is_normal_only(datamodule):
            self._load_released_prompts(f"the training data of {type(datamodule).__name__} holds only normal images")
            self.learns_prompts = False
            self.trainer.fit_loop.max_epochs = 1
            self.trainer.limit_train_batches = 1

    def val_dataloader(self) -> list:
        """No validation data of the model's own.

        Used only when no datamodule is given, e.g. ``anomalib predict --data <folder>``:
        zero-shot models are validated before predicting, and without labelled data the
        probability-scale thresholds of :class:`ProbabilityPostProcessor` stay in place.
        """
        return []

    def on_fit_start(self) -> None:
        """Check that the training data can teach the prompts anything."""
        if self.learns_prompts:
            _check_training_data(self.trainer.datamodule)
            self.prompts_ready = True

    def on_train_start(self) -> None:
        """Open the feature cache of the training images (unless switched off)."""
        if self.learns_prompts and self.hparams.feature_cache:
            self._feature_cache = training_feature_cache(
                self.trainer, self, self.hparams.feature_cache_dir, self.hparams.feature_cache_dtype
            )

    def on_train_epoch_start(self) -> None:
        """Share and log the feature cache's fill and reuse of the previous epoch (see ``FeatureCache.begin_epoch``)."""
        if self._feature_cache is not None:
            self._feature_cache.begin_epoch()

    def on_train_end(self) -> None:
        """Release the feature cache. From now on the prompts are fixed: further runs are zero-shot."""
        if self._feature_cache is not None:
            self._feature_cache.close()
            self._feature_cache = None
        self._validation_cache = None
        self.learns_prompts = False

    def on_validation_start(self) -> None:
        """Make ready to score (prompts, references); serve fit's validation from the training feature cache."""
        self._prepare_scoring()
        self._validation_cache = validation_feature_cache(self.trainer, self, self._feature_cache)

    def on_validation_end(self) -> None:
        """Save a checkpoint (prompts, references, thresholds) after a few-shot model's validation-only fit."""
        if (
            not self.few_shot_config.k_shot
            or self.trainer.state.fn != TrainerFn.VALIDATING
            or self.trainer.sanity_checking
        ):
            return
        callback = self.trainer.checkpoint_callback
        # A checkpoint callback that keeps nothing (save_top_k=0, as in the benchmark) means: no checkpoint.
        if callback is not None and callback.dirpath is not None and callback.save_top_k != 0:
            path = Path(callback.dirpath) / f"{callback.filename or 'model'}{callback.FILE_EXTENSION}"
            self.trainer.save_checkpoint(path)
            logger.info(
                "AnomalyCLIP few-shot checkpoint (prompts, %d references, thresholds): %s",
                self.few_shot_config.k_shot,
                path,
            )

    def on_test_start(self) -> None:
        """Make ready to score: prompts (refused if untrained), references."""
        self._prepare_scoring()

    def on_predict_start(self) -> None:
        """Make ready to score: prompts (refused if untrained), references."""
        self._prepare_scoring()

    def to_torch(self, export_root: str | Path, model_file_name: str = "model") -> Path:
        """Save the inference path for ``TorchInferencer`` (see :mod:`anomalib_anomalyclip.export`)."""
        self._require_ready_for_export()
        with inference_model_in_place(self):
            return super().to_torch(export_root, model_file_name)

    def to_onnx(
        self,
        export_root: str | Path,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        **kwargs,
    ) -> Path:
        """One ONNX graph from image to score and map, with the text embeddings baked in (no text encoder).

        Also the first step of ``to_openvino``. Defaults to ONNX opset 18.
        """
        self._require_ready_for_export()
        kwargs.setdefault("opset_version", EXPORT_OPSET)
        with inference_model_in_place(self):
            return super().to_onnx(export_root, model_file_name, input_size, **kwargs)

    def to_openvino(
        self,
        export_root: str | Path,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        compression_type: CompressionType | None = None,
        datamodule: AnomalibDataModule | None = None,
        **kwargs,
    ) -> Path:
        """OpenVINO export (anomalib's, of the ONNX graph); fails early with a clear message when it cannot run."""
        check_openvino_export(compression_type, datamodule)
        return super().to_openvino(export_root, model_file_name, input_size, compression_type, datamodule, **kwargs)

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """One step of prompt learning with the glocal loss (nothing when the prompts are fixed)."""
        del args, kwargs
        if not self.learns_prompts:
            return None
        paths = getattr(batch, "image_path", None)
        features = visual_features(self.model.visual_encoder, batch.image, paths, self._feature_cache)
        outputs = self.model.outputs_from_features(*features, batch.image.shape[-2:], self._class_names(batch))
        masks, has_mask = _masks_and_presence(batch)
        terms = self.loss(outputs.image_logits, batch.gt_label, outputs.layer_probabilities, masks, has_mask)
        for name, value in terms.items():
            self.log(
                f"train_{name}",
                value,
                prog_bar=name == "loss",
                on_step=False,
                on_epoch=True,
                batch_size=batch.image.shape[0],
                sync_dist=True,
            )
        return terms["loss"]

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Score the batch (anomalib collects normalisation statistics and thresholds).

        Within ``fit``, images whose features the training cache holds are scored from them.
        """
        del args, kwargs
        if self.model.few_shot is not None:
            return batch.update(**self.model(batch.image)._asdict())
        paths = getattr(batch, "image_path", None)
        encoder = self.model.visual_encoder
        features = visual_features(encoder, batch.image, paths, self._validation_cache, record=False)
        predictions = self.model.scores_from_features(*features, batch.image.shape[-2:])
        return batch.update(**predictions._asdict())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the prompts and anomalib's components, not the frozen CLIP (GBs for ViT-L)."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["state_dict"] = {
            key: value for key, value in checkpoint["state_dict"].items() if not key.startswith(FROZEN_PREFIXES)
        }
        checkpoint[CHECKPOINT_INFO_KEY] = {
            "prompts_trained": bool(self.prompts_ready),
            "feature_layers": list(self.model.feature_layers),
            "dpam_kind": self.model.visual_encoder.dpam_kind.value,
            "image_size": self.model.image_size,
        }
        if self.few_shot_config.k_shot:
            checkpoint[CHECKPOINT_INFO_KEY]["few_shot"] = {
                "k_shot": self.few_shot_config.k_shot,
                "layers": list(self.few_shot_config.layers),
                "tokens": self.few_shot_config.tokens.value,
                "fusion": self.few_shot_config.fusion.value,
                "references": list(self._references),
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Load the prompts with a clear error when they were made for another configuration."""
        # The frozen CLIP is this model's own (loaded from ``pretrained``): filling it in keeps Lightning from
        # listing hundreds of "missing" keys on every load.
        frozen = {key: value for key, value in self.state_dict().items() if key.startswith(FROZEN_PREFIXES)}
        checkpoint["state_dict"] = {**frozen, **checkpoint.get("state_dict", {})}
        super().on_load_checkpoint(checkpoint)
        state = prompts_of_lightning_checkpoint(checkpoint)
        if not state:
            raise PromptCheckpointError("The checkpoint holds no AnomalyCLIP prompts (no 'model.prompt_learner.*').")
        self.model.prompt_learner.load_prompt_state(state, source="the Lightning checkpoint")
        info = checkpoint.get(CHECKPOINT_INFO_KEY, {})
        self._warn_on_differences(info)
        self._adopt_few_shot(info.get("few_shot"))
        self.prompts_ready = bool(info.get("prompts_trained", True))
        self.learns_prompts = False

    def _warn_on_differences(self, info: dict[str, Any]) -> None:
        current = {
            "feature_layers": list(self.model.feature_layers),
            "dpam_kind": self.model.visual_encoder.dpam_kind.value,
        }
        for key, value in current.items():
            if key in info and info[key] != value:
                logger.warning("Checkpoint prompts were trained with %s=%s; this model uses %s.", key, info[key], value)

    def _require_prompts(self) -> None:
        if self.prompts_ready:
            return
        raise PromptsUnavailableError(
            "AnomalyCLIP has no trained prompts, and scoring with untrained prompts gives meaningless results. "
            "Either pass released prompts (downloaded once and cached): --model.prompt_weights anomalyclip-mvtec "
            "(trained on MVTec AD; use anomalyclip-visa when testing on MVTec AD), or a prompt file: "
            "--model.prompt_weights /path/to/epoch_15.pth, or a trained checkpoint: --ckpt_path model.ckpt. "
            "To learn prompts, run `anomalib fit` with anomalib_anomalyclip.data.AuxiliaryDataModule."
        )

    def _prepare_scoring(self) -> None:
        """Prompts (released ones when the data chose them and none are loaded) and the few-shot references."""
        if not self.prompts_ready and self.prompts_chosen_by_data:
            self._load_released_prompts("no prompts were given and this run trains none")
        self._require_prompts()
        if self.few_shot_config.k_shot:
            self._ensure_references(required=True)

    def _load_released_prompts(self, reason: str) -> None:
        datamodule = self.trainer.datamodule if getattr(self, "_trainer", None) is not None else None
        released = released_prompts_for(datamodule)
        logger.info(
            "AnomalyCLIP uses the released prompts '%s' (trained on %s), because %s; pass --model.prompt_weights "
            "to choose others.",
            released.name,
            released.trained_on,
            reason,
        )
        self.model.prompt_learner.load_checkpoint(resolve_prompt_weights(released.name))
        self.prompts_ready = True

    def _ensure_references(self, required: bool) -> None:
        """Fill the bank from the references unless it holds them already (this run, or restored from a checkpoint)."""
        if self.model.few_shot.active and (self._references_restored or self.hparams.few_shot_source):
            return  # restored, or filled this run from the folder (which is not listed and checked again)
        # Without a source (e.g. predicting on a folder after fit), a filled bank stays as it is.
        source = self._reference_source(required and not self.model.few_shot.active)
        if source is None:
            return
        paths = choose_references(source.paths, self.few_shot_config.k_shot, self.hparams.seed or 0, source.description)
        if self.model.few_shot.active and paths == self._references:
            return
        images = load_references(paths, source, self.pre_processor.transform if self.pre_processor else None)
        left_out = self.model.remember_references(images.to(self.device))
        self._references = paths
        logger.info(
            "AnomalyCLIP few-shot references (%d from %s): %s; memory bank %s, %.1f MB.",
            len(paths),
            source.description,
            ", ".join(Path(path).name for path in paths),
            "x".join(str(size) for size in self.model.few_shot.memory.shape),
            self.model.few_shot.memory_bytes / 1e6,
        )
        if left_out is not None and isinstance(self.post_processor, ProbabilityPostProcessor):
            self.post_processor.set_normal_thresholds(
                left_out.pred_score, left_out.anomaly_map, "references scored leave-one-out"
            )

    def _reference_source(self, required: bool) -> ReferenceSource | None:
        if self.hparams.few_shot_source:
            return folder_references(self.hparams.few_shot_source)
        datamodule = self.trainer.datamodule if getattr(self, "_trainer", None) is not None else None
        if getattr(datamodule, "train_data", None) is not None:
            return datamodule_references(datamodule)
        if not required:
            return None
        raise ValueError(
            f"k_shot={self.few_shot_config.k_shot} needs normal reference images, but there is no datamodule with a "
            "train split. Give a folder of normal images with --model.few_shot_source, or --ckpt_path a "
            "checkpoint of a few-shot run (it holds the references)."
        )

    def _require_ready_for_export(self) -> None:
        self._require_prompts()
        if self.few_shot_config.k_shot and not self.model.few_shot.active:
            if not self.hparams.few_shot_source:
                raise ValueError(
                    "This few-shot model holds no references yet, so an export would be zero-shot. Export with "
                    "--ckpt_path of the checkpoint that `anomalib train` saved, or give --model.few_shot_source."
                )
            self._ensure_references(required=True)

    def _build_few_shot(self, settings: FewShotSettings) -> None:
        scorer = self.model.build_few_shot_scorer(settings.taps, settings.fusion)
        self.model.few_shot = scorer.to(self.model.text_features.device)
        self.few_shot_config = settings

    def _adopt_few_shot(self, stored: dict[str, Any] | None) -> None:
        """Take the few-shot settings of a checkpoint; a few-shot model must match them."""
        if not stored:
            return
        settings = few_shot_settings(
            int(stored["k_shot"]), stored["layers"], stored["tokens"], stored["fusion"], self.model.feature_layers
        )
        current = self.few_shot_config
        if current.k_shot and settings.taps != current.taps:
            raise PromptCheckpointError(
                f"The checkpoint's few-shot bank reads layers {list(settings.layers)} ({settings.tokens.value} "
                f"tokens); this model reads {list(current.layers)} ({current.tokens.value}). Drop the "
                "few_shot_layers/few_shot_tokens arguments to use the checkpoint's."
            )
        if not self.few_shot_config.k_shot:
            self._build_few_shot(settings)
            self._set_probability_scale()
        self._references = list(stored.get("references", []))
        self._references_restored = True

    def _set_probability_scale(self) -> None:
        if isinstance(self.post_processor, ProbabilityPostProcessor):
            # Fused few-shot maps lie in [0, 1]; zero-shot maps are summed over the feature layers.
            self.post_processor.set_probability_scale(
                1.0 if self.few_shot_config.k_shot else len(self.model.feature_layers)
            )

    def _class_names(self, batch: Batch) -> list[str] | None:
        if self.model.prompt_learner.config.prompt_type is PromptType.OBJECT_AGNOSTIC:
            return None
        datamodule = self.trainer.datamodule if getattr(self, "_trainer", None) is not None else None
        if datamodule is not None and hasattr(datamodule, "class_names_for"):
            return datamodule.class_names_for(list(batch.image_path))
        return [self.model.class_name] * batch.image.shape[0]


def _masks_and_presence(batch: Batch) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Masks as float (B, H, W) and which images have a real mask (see :func:`has_pixel_mask`)."""
    if batch.gt_mask is None:
        return None, has_pixel_mask(batch)
    masks = batch.gt_mask.float()
    return (masks.squeeze(1) if masks.dim() == 4 else masks), has_pixel_mask(batch)


def training_data_is_normal_only(datamodule: object) -> bool:
    """Whether the datamodule's train split is known to hold normal images only (anomalib's one-class data)."""
    samples = getattr(getattr(datamodule, "train_data", None), "samples", None)
    if samples is None or "label_index" not in getattr(samples, "columns", ()):
        return False
    return bool(len(samples)) and not bool((samples["label_index"] == 1).any())


def _check_training_data(datamodule: object) -> None:
    """Stop early when the training split has no anomalous images (nothing to learn from)."""
    if training_data_is_normal_only(datamodule):
        name = type(datamodule).__name__
        raise ValueError(
            f"The training data of {name} holds only normal images, but AnomalyCLIP learns its prompts from labelled "
            "normal and anomalous images (with masks where available). Train on an auxiliary labelled set with "
            "--data anomalib_anomalyclip.data.AuxiliaryDataModule, or evaluate zero-shot with "
            "--model.prompt_weights anomalyclip-mvtec (or a prompt file)."
        )


expose_in_anomalib(AnomalyCLIP)

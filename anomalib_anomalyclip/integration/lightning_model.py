"""AnomalyCLIP as an anomalib model: ``anomalib train|fit|test|predict|export --model AnomalyCLIP``.

Zero-shot with prompts from ``prompt_weights``; few-shot with ``k_shot`` normal references (:mod:`.few_shot`);
mutual scoring of the run's images with ``mutual`` (:mod:`.mutual`); tiled for small defects on large images
with ``tiling`` (:mod:`.tiling`); prompt training in ``fit`` on labelled images (the paper's protocol). Where the
prompts come from is :func:`.prompt_plan.plan_prompts`'s decision: with nothing to learn them from, the released
prompts trained on the other dataset, and a ``fit`` on normal images then ends its training loop after one batch
without a gradient step (:meth:`AnomalyCLIP.setup`). The computation is the torch model's (:mod:`.torch_model`);
:mod:`.callbacks` keep the feature cache, check inputs and write ``predictions.csv`` and the few-shot checkpoint.

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
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import ImageVisualizer, Visualizer
from lightning.pytorch import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn

from anomalib_anomalyclip._registry import expose
from anomalib_anomalyclip.cli.patches import cut_training_to_one_batch
from anomalib_anomalyclip.config import (
    AnomalyCLIPConfig,
    Dpam,
    FeatureCaching,
    FewShot,
    MutualScoring,
    Prompts,
    Tiling,
    Training,
    accepts_flat_arguments,
)
from anomalib_anomalyclip.data.references import load_references, missing_references, reference_source
from anomalib_anomalyclip.data.samples import has_pixel_mask
from anomalib_anomalyclip.errors import PromptsUnavailableError, explain_setup_errors
from anomalib_anomalyclip.integration.callbacks import ConvertingImageVisualizer, model_callbacks
from anomalib_anomalyclip.integration.checkpoints import CheckedCheckpointLoading, restore_model_state, save_model_state
from anomalib_anomalyclip.integration.export import InferencePathExport
from anomalib_anomalyclip.integration.feature_cache import FeatureCache
from anomalib_anomalyclip.integration.metrics import anomalyclip_evaluator
from anomalib_anomalyclip.integration.pool_scoring import PooledLoops
from anomalib_anomalyclip.integration.post_processor import DEFAULT_NORMAL_QUANTILE, ProbabilityPostProcessor
from anomalib_anomalyclip.integration.pre_processor import PreprocessingName, clip_pre_processor, follow_tiling
from anomalib_anomalyclip.integration.prompt_plan import PromptPlan, PromptState, plan_prompts
from anomalib_anomalyclip.method.backbone import clip_source
from anomalib_anomalyclip.method.dpam import DpamKind
from anomalib_anomalyclip.method.few_shot import choose_references
from anomalib_anomalyclip.method.loss import GlocalLoss, LossVariant
from anomalib_anomalyclip.method.prompts import PromptType
from anomalib_anomalyclip.method.tiled_model import check_tiled_training
from anomalib_anomalyclip.method.torch_model import AnomalyCLIPModel

logger = logging.getLogger(__name__)

__all__ = ["AnomalyCLIP", "ProbabilityPostProcessor", "PromptsUnavailableError"]


class AnomalyCLIP(CheckedCheckpointLoading, InferencePathExport, PooledLoops, AnomalibModule):
    """AnomalyCLIP: object-agnostic prompt learning for zero-shot anomaly detection.

    The capabilities are configured in groups (:mod:`anomalib_anomalyclip.config`): on the command line
    ``--model.mutual.fraction 0.25``, in YAML ``mutual: {fraction: 0.25}``, in Python ``mutual=MutualScoring(...)``
    or a mapping. ``mutual`` and ``tiling`` are off until enabled: ``--model.mutual true`` (YAML ``mutual: true``,
    Python ``mutual=True``) stands for ``--model.mutual.enabled true``. Flat arguments of earlier versions
    (``mutual_scoring``, ``tile_size``, ...) are still accepted, with a
    warning naming the new spelling (:func:`anomalib_anomalyclip.config.upgrade`).

    Args:
        backbone: open_clip model name of the frozen CLIP.
        pretrained: open_clip tag (``"openai"``) or a local CLIP checkpoint file.
        image_size: side of the square input (images are resized to it, bicubic).
        prompt_weights: prompts for zero-shot use: a file (ours or the reference's released ``epoch_15.pth``), an
            http(s) URL, or a released short name (``anomalyclip-mvtec``: trained on MVTec AD; ``anomalyclip-visa``:
            trained on VisA). ``None``: the prompts start untrained and are learned by ``fit``.
        k_shot: number of normal reference images for the few-shot memory bank; 0: zero-shot. Taken from the
            datamodule's train split unless ``few_shot.source``.
        prompts: the learnable prompts (:class:`~anomalib_anomalyclip.config.Prompts`).
        training: prompt learning in ``fit`` (:class:`~anomalib_anomalyclip.config.Training`).
        dpam: the dual-path features and the maps (:class:`~anomalib_anomalyclip.config.Dpam`).
        few_shot: the few-shot bank, used with ``k_shot`` (:class:`~anomalib_anomalyclip.config.FewShot`).
        mutual: mutual scoring of each image against the other images of its pool (the images of a validation, test
            or predict run, per category or folder), fused with the prompts
            (:class:`~anomalib_anomalyclip.config.MutualScoring`); ``--model.mutual true`` switches it on.
        tiling: tiled inference for small defects on large images (:class:`~anomalib_anomalyclip.config.Tiling`);
            ``--model.tiling true`` switches it on (anomalib's ``TilerConfigurationCallback`` too).
        feature_cache: the feature cache of prompt training (:class:`~anomalib_anomalyclip.config.FeatureCaching`).
        normal_quantile: when validation sees only normal images (or the references, scored leave-one-out), the
            thresholds are this quantile of their scores: ``1 - normal_quantile`` is the accepted false-alarm rate.
        preprocessing: ``reference`` (default): each image resized on its own as the reference implementation does
            (8-bit PIL bicubic, masks bilinear > 0.5; also in exported graphs); ``fast``: anomalib's float resize
            (masks nearest). See :mod:`.pre_processor`.
        cache_dir: open_clip's download cache for ``pretrained`` tags.
        pre_processor: anomalib pre-processor, or ``True`` for resize + CLIP normalisation as ``preprocessing`` says.
        post_processor: anomalib post-processor, or ``True`` for the default.
        evaluator: anomalib evaluator, or ``True`` for image AUROC/AP/F1-max and pixel AUROC/AUPRO/F1-max.
        visualizer: anomalib visualizer, or ``True`` for the default.
    """

    @accepts_flat_arguments
    @explain_setup_errors
    def __init__(
        self,
        backbone: str = "ViT-L-14-336",
        pretrained: str | None = "openai",
        image_size: int = 518,
        prompt_weights: str | None = None,
        k_shot: int = 0,
        prompts: Prompts = Prompts(),  # noqa: B008 - frozen dataclasses: shared defaults are safe
        training: Training = Training(),  # noqa: B008
        dpam: Dpam = Dpam(),  # noqa: B008
        few_shot: FewShot = FewShot(),  # noqa: B008
        mutual: MutualScoring = MutualScoring(),  # noqa: B008
        tiling: Tiling = Tiling(),  # noqa: B008
        feature_cache: FeatureCaching = FeatureCaching(),  # noqa: B008
        normal_quantile: float = DEFAULT_NORMAL_QUANTILE,
        preprocessing: PreprocessingName = "reference",
        cache_dir: str | None = None,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        config = AnomalyCLIPConfig.from_arguments(
            backbone=backbone, pretrained=pretrained, image_size=image_size, prompt_weights=prompt_weights,
            k_shot=k_shot, prompts=prompts, training=training, dpam=dpam, few_shot=few_shot, mutual=mutual,
            tiling=tiling, feature_cache=feature_cache, normal_quantile=normal_quantile, preprocessing=preprocessing,
            cache_dir=cache_dir,
        )  # fmt: skip
        model = AnomalyCLIPModel.from_config(config)
        if pre_processor is True:  # tiled: resize to the working size (None: not at all)
            pre_processor = clip_pre_processor(model.input_resolution, preprocessing)
        if post_processor is True:
            post_processor = ProbabilityPostProcessor(normal_quantile)
        super().__init__(
            pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator, visualizer=visualizer
        )
        self.model = model
        self.config = config
        self.save_hyperparameters(config.hyper_parameters())  # plain values: checkpoints stay readable weights-only
        self.loss = GlocalLoss(LossVariant(config.training.loss), config.training.local_loss_weight)
        given = prompt_weights is not None
        learn = plan_prompts(prompt_weights, config.training.learn, k_shot, ready=given, fitting=True).learn
        self.prompt_state = PromptState.initial(given, learn)
        # Set by FeatureCacheCallback while prompts are trained (see anomalib_anomalyclip.integration.feature_cache).
        self.train_features: FeatureCache | None = None
        self.val_features: FeatureCache | None = None
        self.references: list[str] = []  # the few-shot reference images in the bank
        self._references_restored = False
        self._set_probability_scale()
        self.strict_loading = False  # the frozen CLIP is not stored in checkpoints

    @classmethod
    def configure_pre_processor(
        cls, image_size: tuple[int, int] | None = None, preprocessing: PreprocessingName = "reference"
    ) -> PreProcessor:
        """Resize to the model's input size (bicubic) and normalise with CLIP's statistics (see :mod:`.pre_processor`).

        Args:
            image_size: (height, width); ``None`` means 518 x 518 as in the paper.
            preprocessing: ``reference`` (the reference's 8-bit resize) or ``fast`` (anomalib's float resize).
        """
        return clip_pre_processor(image_size or (518, 518), preprocessing)

    @staticmethod
    def configure_post_processor() -> PostProcessor:
        """Normalised [0, 1] scores and maps; thresholds from validation data (half of each range until then)."""
        return ProbabilityPostProcessor()

    @staticmethod
    def configure_evaluator() -> Evaluator:
        """Image AUROC, AP and F1-max; pixel AUROC, AUPRO (anomalib's and the paper's) and F1-max."""
        return anomalyclip_evaluator()

    @classmethod
    def configure_visualizer(cls) -> ImageVisualizer:
        """The image visualiser, drawing overlays on the images as this package converts them (16-bit, alpha)."""
        return ConvertingImageVisualizer()

    def configure_callbacks(self) -> list[Callback]:
        """The components' callbacks, then this package's (see :mod:`.callbacks`)."""
        return [*super().configure_callbacks(), *model_callbacks()]

    def configure_optimizers(self) -> torch.optim.Optimizer | None:
        """Adam over the prompt parameters only (about 43 K numbers for ViT-L/14@336)."""
        if not self.prompt_state.learns:
            return None
        training = self.config.training
        return torch.optim.Adam(self.model.prompt_parameters(), lr=training.lr, betas=training.betas)

    @property
    def learning_type(self) -> LearningType:
        """``FEW_SHOT`` with k_shot; ``ONE_CLASS`` (anomalib's "needs fitting") to learn prompts; else ``ZERO_SHOT``."""
        if self.model.k_shot:
            return LearningType.FEW_SHOT
        return LearningType.ONE_CLASS if self.prompt_state.learns else LearningType.ZERO_SHOT

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """Epochs of prompt training; nothing for zero-shot use."""
        if not self.prompt_state.learns:
            return {}
        return {"max_epochs": self.config.training.epochs, "num_sanity_val_steps": 0}

    @classmethod
    def checkpoint_safe_globals(cls) -> Sequence[Any]:
        """Enums that may appear in the saved hyper-parameters of older checkpoints."""
        return (DpamKind, PromptType, LossVariant)

    def setup(self, stage: str) -> None:
        """Take the object name from the datamodule's category; decide where the prompts of a fit come from.

        A fit with prompts chosen by the data on normal images only (the plain ``anomalib train --model
        AnomalyCLIP --data MVTecAD``) has nothing to learn: the released prompts are loaded and the training
        loop is cut to one batch without a gradient step, so that anomalib's validation and checkpoint follow.
        """
        follow_tiling(self)  # after TilerConfigurationCallback: resize to the working resolution
        datamodule = self._datamodule()
        category = getattr(datamodule, "category", None)
        if self.config.prompts.class_name is None and isinstance(category, str) and category:
            self.model.use_class_name(category)
        if stage != TrainerFn.FITTING or not self.prompt_state.learns:
            return
        plan = self._prompt_plan(fitting=True, datamodule=datamodule)
        if plan.learn:
            check_tiled_training(self.model.tiling)
            self.prompt_state = PromptState.LEARNING  # the fit gives them
            return
        self._load_released_prompts(plan)
        cut_training_to_one_batch(self.trainer)

    def val_dataloader(self) -> list:
        """No validation data of its own (``predict --data <folder>``: the probability-scale thresholds stay)."""
        return []

    def on_train_end(self) -> None:
        """From now on the prompts are fixed: further runs are zero-shot."""
        if self.prompt_state.learns:
            self.prompt_state = PromptState.FIXED

    def on_validation_start(self) -> None:
        """Make ready to score: prompts (refused if untrained), references, the pools of mutual scoring."""
        self.prepare_scoring(self._loop_dataloaders("val"))

    def on_test_start(self) -> None:
        """Make ready to score: prompts (refused if untrained), references, the pools of mutual scoring."""
        self.prepare_scoring(self._loop_dataloaders("test"))

    def on_predict_start(self) -> None:
        """Make ready to score: prompts (refused if untrained), references, the pools of mutual scoring."""
        self.prepare_scoring(self._loop_dataloaders("predict"))

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """One step of prompt learning with the glocal loss (nothing when the prompts are fixed)."""
        del args, kwargs
        if not self.prompt_state.learns:
            return None
        features = self._visual_features(batch, self.train_features, record=True)
        outputs = self.model.outputs_from_features(*features, batch.image.shape[-2:], self._class_names(batch))
        masks = None if batch.gt_mask is None else batch.gt_mask.float().reshape(-1, *batch.gt_mask.shape[-2:])
        probabilities = outputs.layer_probabilities
        terms = self.loss(outputs.image_logits, batch.gt_label, probabilities, masks, has_pixel_mask(batch))
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
        """Score the batch (anomalib collects thresholds); within ``fit``, from the training features where cached."""
        del args, kwargs
        return self._scored(batch)

    def test_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Score the batch; with mutual scoring, look up the scores of the pools computed at the loop's start."""
        del args, kwargs
        return self._scored(batch)

    def predict_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Score the batch; with mutual scoring, look up the scores of the pools computed at the loop's start."""
        del args, kwargs
        return self._scored(batch)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the prompts, references and anomalib's components, not the frozen CLIP (see :mod:`.checkpoints`)."""
        super().on_save_checkpoint(checkpoint)
        clip = clip_source(self.config.backbone, self.config.pretrained)
        save_model_state(checkpoint, self.model, self.prompt_state.ready, self.references, clip)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Load the prompts (and a few-shot bank), with a clear error when they were made for another configuration."""
        restored = restore_model_state(checkpoint, self.model, self.state_dict())
        super().on_load_checkpoint(checkpoint)
        follow_tiling(self)  # the stored pre-processing may be an untiled model's
        self._set_probability_scale()
        self.prompt_state = PromptState.FIXED if restored.prompts_trained else PromptState.MISSING
        if self.model.k_shot:
            self.references = restored.references
            self._references_restored = True

    def prepare_scoring(self, dataloaders: Any = None) -> None:
        """Prompts (released ones when the plan says so), the few-shot references, then the pools of ``dataloaders``.

        Refuses untrained prompts. With mutual scoring, every image of ``dataloaders`` is encoded once and scored
        against its pool here, one subset at a time (see :mod:`.pool_scoring`); the steps look the results up.
        """
        plan = self._prompt_plan(fitting=False, datamodule=self._datamodule())
        if plan.released is not None:
            self._load_released_prompts(plan)
        self._require_prompts()
        if self.model.k_shot:
            self.collect_references(required=True)
        self.pool_scores = None
        if self.model.mutual:
            transform = self.pre_processor.transform if self.pre_processor is not None else None
            self.score_loop_pools(self.model, transform, dataloaders, self.references)

    def on_predict_end(self) -> None:
        """Remove the state of mutual scoring's pools: ``predictions.csv`` and the overlays hold the results."""
        self.discard_pool_state()

    def on_test_end(self) -> None:
        """Remove the state of mutual scoring's pools (kept from validation to test): the metrics are computed."""
        self.discard_pool_state()

    def on_validation_end(self) -> None:
        """Within ``fit``, remove the state of mutual scoring's pools: the next epoch's prompts differ."""
        if self.trainer.state.fn == TrainerFn.FITTING:
            self.discard_pool_state()

    def prepare_export(self) -> None:
        """Refuse to export untrained prompts or an empty few-shot bank."""
        self._require_prompts()
        if self.model.k_shot and not self.model.has_references:
            if not self.config.few_shot.source:
                raise ValueError(
                    "This few-shot model holds no references yet, so an export would be zero-shot. Export with "
                    "--ckpt_path of the checkpoint that `anomalib train` saved, or give --model.few_shot.source."
                )
            self.collect_references(required=True)

    def _require_prompts(self) -> None:
        if not self.prompt_state.ready:
            raise PromptsUnavailableError

    def collect_references(self, required: bool) -> None:
        """Fill the bank from the references unless it holds them already (this run, or restored from a checkpoint).

        Args:
            required: fail when there is no source of references and the bank is empty.
        """
        few_shot = self.config.few_shot
        if self.model.has_references and (self._references_restored or few_shot.source):
            return  # restored, or filled this run from the folder (which is not listed and checked again)
        source = reference_source(few_shot.source, self._datamodule(), self.model.k_shot)
        if source is None and required and not self.model.has_references:
            raise missing_references(self.model.k_shot)
        if source is None:
            return  # e.g. predicting on a folder after fit: a filled bank stays as it is
        paths = choose_references(source.paths, self.model.k_shot, few_shot.seed, source.description)
        if self.model.has_references and paths == self.references:
            return
        transform = self.pre_processor.transform if self.pre_processor else None
        left_out = self.model.remember_references(load_references(paths, source, transform).to(self.device))
        self.references = paths
        names = ", ".join(Path(path).name for path in paths)
        message = "AnomalyCLIP few-shot references (%d from %s): %s; %s."
        logger.info(message, len(paths), source.description, names, self.model.describe_bank())
        if left_out is not None and isinstance(self.post_processor, ProbabilityPostProcessor):
            scores, maps = left_out.pred_score, left_out.anomaly_map
            self.post_processor.set_normal_thresholds(scores, maps, "references scored leave-one-out")

    def _prompt_plan(self, fitting: bool, datamodule: object | None) -> PromptPlan:
        return plan_prompts(
            self.config.prompt_weights,
            self.config.training.learn,
            self.config.k_shot,
            ready=self.prompt_state.ready,
            fitting=fitting,
            datamodule=datamodule,
        )

    def _load_released_prompts(self, plan: PromptPlan) -> None:
        self.model.load_prompts(plan.released_file())
        self.prompt_state = PromptState.FIXED

    def _scored(self, batch: Batch) -> Batch:
        """The batch with its scores: looked up in the pools, or the torch model's (cached features within a fit)."""
        if self.pool_scores is not None:
            return batch.update(**self.pooled(batch)._asdict())
        if self.val_features is not None and self.model.tiling is None and not self.model.has_references:
            features = self._visual_features(batch, self.val_features, record=False)
            scored = self.model.scores_from_features(*features, batch.image.shape[-2:])
        else:
            scored = self.model.score(batch.image)
        return batch.update(**scored._asdict())

    def _visual_features(
        self, batch: Batch, cache: FeatureCache | None, record: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Global embeddings and feature-layer tokens of the batch, from the feature cache where it holds them.

        Args:
            batch: the batch (its ``image_path`` are the cache's keys).
            cache: the feature cache of prompt training (see :mod:`.feature_cache`), or ``None``.
            record: store computed features in the cache (training) or only read it (validation).
        """
        paths = getattr(batch, "image_path", None)
        if cache is None or paths is None:
            with torch.no_grad():
                return self.model.visual_encoder(batch.image)
        return cache.features(batch.image, paths, self.model.visual_encoder, record=record)

    def _set_probability_scale(self) -> None:
        if isinstance(self.post_processor, ProbabilityPostProcessor):
            self.post_processor.set_probability_scale(self.model.map_scale)

    def _loop_dataloaders(self, stage: str) -> Any:
        return getattr(self._trainer, f"{stage}_dataloaders", None) if self._trainer is not None else None

    def _datamodule(self) -> object | None:
        return self._trainer.datamodule if self._trainer is not None else None

    def _class_names(self, batch: Batch) -> list[str] | None:
        if not self.model.uses_class_names:
            return None
        datamodule = self._datamodule()
        if datamodule is not None and hasattr(datamodule, "class_names_for"):
            return datamodule.class_names_for(list(batch.image_path))
        return [self.model.class_name] * batch.image.shape[0]


expose(AnomalyCLIP)  # also when this module is imported first (see _registry)

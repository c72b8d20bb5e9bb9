"""anomalib's post-processor on AnomalyCLIP's own probability scale, with thresholds from normal images.

Scores and maps of AnomalyCLIP lie on a known range (probabilities), so they are
normalised on that fixed range instead of on min-max statistics of the validation data.

Thresholds come from validation:

* with anomalous images among the validation data, anomalib's adaptive F1 thresholds;
* with normal images only (a normal-only validation split, or the few-shot references
  scored leave-one-out), the ``normal_quantile`` quantile of the normal images' scores
  (image threshold) and of their pixels' map values (pixel threshold). ``1 -
  normal_quantile`` is the false-alarm rate the user accepts on normal images;
* without any validation data, half of each range (the likelier prompt wins).

Decisions (``pred_label``, ``pred_mask``) follow one rule, in eager runs and inside exported graphs alike: anomalous
when the normalised value exceeds 0.5 by more than :data:`DECISION_MARGIN`. A threshold is an image's own score
(adaptive F1) or a quantile of them, so one image sits exactly on it; an exported graph computes that score a few
1e-7 apart, and a bare ``>`` gave it a different decision there.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from anomalib.data import Batch
from anomalib.post_processing import PostProcessor
from lightning.pytorch import LightningModule, Trainer

logger = logging.getLogger(__name__)

DEFAULT_NORMAL_QUANTILE = 0.99
DECISION_MARGIN = 1e-5
"""Normalised values up to ``0.5 + DECISION_MARGIN`` are normal (above the float noise of exported graphs)."""
PIXEL_HISTOGRAM_BINS = 1 << 14  # pixel quantile resolution: 1/16384 of the map's range


def check_quantile(normal_quantile: float) -> float:
    """``normal_quantile`` if it lies in (0, 1], else a ``ValueError`` saying what it means."""
    if not 0 < normal_quantile <= 1:
        raise ValueError(
            f"normal_quantile must lie in (0, 1], got {normal_quantile}: it is the share of normal images "
            "(and pixels) below the threshold, e.g. 0.99 accepts a 1% false-alarm rate."
        )
    return float(normal_quantile)


class ProbabilityPostProcessor(PostProcessor):
    """anomalib's post-processor on AnomalyCLIP's own probability scale.

    AnomalyCLIP's image score is a probability of "abnormal" and each layer map a
    per-pixel probability, so the value range is known ([0, 1] for scores; [0, number
    of layers] for zero-shot maps, which are summed over the feature layers; [0, 1] for
    few-shot maps). Scores are normalised piecewise linearly on that fixed range so that
    the threshold lands on 0.5: strictly monotone, so AUROC/AP/AUPRO of normalised
    outputs equal those of raw outputs, even on data whose scores fall outside what
    validation saw (anomalib's min-max normalisation clamps those, which ties them).

    Args:
        normal_quantile: quantile of normal images' scores (and pixels) used as threshold
            when validation holds no anomalous images.
        **kwargs: anomalib ``PostProcessor`` arguments.
    """

    def __init__(self, normal_quantile: float = DEFAULT_NORMAL_QUANTILE, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.normal_quantile = check_quantile(normal_quantile)
        self.threshold_origin = "probability scale (no validation data yet)"
        self._reset_normal_statistics()

    @property
    def _checkpoint_config_keys(self) -> tuple[str, ...]:
        return (*super()._checkpoint_config_keys, "normal_quantile", "threshold_origin")

    @staticmethod
    def _apply_threshold(preds: torch.Tensor | None, threshold: torch.Tensor) -> torch.Tensor | None:
        """Anomalous where ``preds`` exceed ``threshold`` by more than :data:`DECISION_MARGIN` (also when exported)."""
        if preds is None:
            return preds
        if not torch.compiler.is_compiling() and torch.isnan(threshold).item():
            return preds
        return preds > threshold + DECISION_MARGIN

    def set_probability_scale(self, pixel_max: float) -> None:
        """Fix the value ranges ([0, 1] scores, [0, ``pixel_max``] maps); thresholds at half of each."""
        with torch.no_grad():
            self._image_threshold.fill_(0.5)
            self._pixel_threshold.fill_(pixel_max / 2)
            self.image_min.fill_(0.0)
            self.image_max.fill_(1.0)
            self.pixel_min.fill_(0.0)
            self.pixel_max.fill_(float(pixel_max))

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Batch, *args, **kwargs
    ) -> None:
        """Collect F1 threshold statistics and the normal images' scores; the value ranges are fixed."""
        del trainer, pl_module, args, kwargs
        if not self.enable_thresholding:
            return
        self._image_threshold_metric.update(outputs)
        self._pixel_threshold_metric.update(outputs)
        self._collect_normals(outputs)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """F1 thresholds when validation saw anomalies; normal-image quantiles when it saw normal images only."""
        del trainer, pl_module
        if not self.enable_thresholding or not self._image_threshold_metric.update_called:
            return
        if self._saw_anomalies:
            self._image_threshold.copy_(self._image_threshold_metric.compute())
            if self._pixel_threshold_metric.update_called:
                self._pixel_threshold.copy_(self._pixel_threshold_metric.compute())
            self._log_thresholds("adaptive F1 on validation images with anomalies")
        elif self._normal_scores:
            self._set_quantile_thresholds(torch.cat(self._normal_scores), "normal-only validation images")
        self._image_threshold_metric.reset()
        self._pixel_threshold_metric.reset()
        self._reset_normal_statistics()

    def set_normal_thresholds(self, scores: torch.Tensor, maps: torch.Tensor, source: str) -> None:
        """Thresholds from the scores (N,) and maps (N, 1, H, W) of normal images, e.g. references left out in turn."""
        self._reset_normal_statistics()
        self._add_pixels(maps)
        self._set_quantile_thresholds(scores.detach().flatten().float().cpu(), source)
        self._reset_normal_statistics()

    def _set_quantile_thresholds(self, scores: torch.Tensor, source: str) -> None:
        with torch.no_grad():
            self._image_threshold.fill_(float(torch.quantile(scores.double(), self.normal_quantile)))
            if self._pixel_histogram is not None:
                self._pixel_threshold.fill_(self._histogram_quantile(self._pixel_histogram))
        self._log_thresholds(f"{self.normal_quantile:g} quantile of {len(scores)} {source}")

    def _log_thresholds(self, origin: str) -> None:
        self.threshold_origin = origin
        logger.info(
            "AnomalyCLIP thresholds: image %.4f, pixel %.4f (%s).",
            float(self._image_threshold),
            float(self._pixel_threshold),
            origin,
        )

    def _collect_normals(self, outputs: Batch) -> None:
        labels = getattr(outputs, "gt_label", None)
        scores = getattr(outputs, "pred_score", None)
        if labels is None or scores is None:
            return
        labels = labels.detach().flatten().bool().cpu()
        self._saw_anomalies = self._saw_anomalies or bool(labels.any())
        normal = ~labels
        self._normal_scores.append(scores.detach().flatten().float().cpu()[normal])
        maps = getattr(outputs, "anomaly_map", None)
        if maps is not None and bool(normal.any()):
            self._add_pixels(maps.detach()[normal.to(maps.device)])

    def _add_pixels(self, maps: torch.Tensor) -> None:
        low, high = float(self.pixel_min), float(self.pixel_max)
        counts = torch.histc(maps.float().flatten().cpu().clamp(low, high), PIXEL_HISTOGRAM_BINS, low, high)
        self._pixel_histogram = counts if self._pixel_histogram is None else self._pixel_histogram + counts

    def _histogram_quantile(self, counts: torch.Tensor) -> float:
        """Upper edge of the first bin whose cumulative share reaches ``normal_quantile``."""
        cumulative = counts.double().cumsum(0) / counts.sum().double()
        index = int(torch.searchsorted(cumulative, torch.tensor([self.normal_quantile], dtype=torch.float64)))
        low, high = float(self.pixel_min), float(self.pixel_max)
        return low + (high - low) * min(index + 1, PIXEL_HISTOGRAM_BINS) / PIXEL_HISTOGRAM_BINS

    def _reset_normal_statistics(self) -> None:
        self._normal_scores: list[torch.Tensor] = []
        self._pixel_histogram: torch.Tensor | None = None
        self._saw_anomalies = False

    @staticmethod
    def _normalize(
        preds: torch.Tensor | None, norm_min: torch.Tensor, norm_max: torch.Tensor, threshold: torch.Tensor
    ) -> torch.Tensor | None:
        """Map [min, threshold] to [0, 0.5] and [threshold, max] to [0.5, 1] linearly."""
        if preds is None:
            return preds
        span = norm_max - norm_min
        threshold = torch.where(torch.isnan(threshold), (norm_max + norm_min) / 2, threshold)
        threshold = torch.minimum(torch.maximum(threshold, norm_min + 1e-6 * span), norm_max - 1e-6 * span)
        below = 0.5 * (preds - norm_min) / (threshold - norm_min)
        above = 0.5 + 0.5 * (preds - threshold) / (norm_max - threshold)
        return torch.where(preds < threshold, below, above).clamp(0, 1)


_STATE_BUFFERS = ("_image_threshold", "_pixel_threshold", "image_min", "image_max", "pixel_min", "pixel_max")
_STATE_SETTINGS = (
    "enable_normalization",
    "enable_thresholding",
    "enable_threshold_matching",
    "image_sensitivity",
    "pixel_sensitivity",
)
_KINDS = {"probability": ProbabilityPostProcessor, "anomalib": PostProcessor}


def post_processor_state(post_processor: PostProcessor) -> dict[str, Any]:
    """The thresholds, value ranges and settings of ``post_processor`` as plain values (e.g. an export's metadata).

    Raises:
        TypeError: ``post_processor`` is neither this package's nor anomalib's own (its rule cannot be rebuilt).
    """
    kind = next((name for name, kind in _KINDS.items() if type(post_processor) is kind), None)
    if kind is None:
        raise TypeError(
            f"{type(post_processor).__name__} cannot be carried into an export of mutual scoring, which applies the "
            "post-processor after the pool is scored: use the default post-processor."
        )
    state: dict[str, Any] = {"kind": kind}
    state.update({name: float(getattr(post_processor, name)) for name in _STATE_BUFFERS})
    state.update({name: getattr(post_processor, name) for name in _STATE_SETTINGS})
    return state


def post_processor_from_state(state: dict[str, Any]) -> PostProcessor:
    """The post-processor that :func:`post_processor_state` described, with the same thresholds and ranges."""
    post_processor = _KINDS[state["kind"]](**{name: state[name] for name in _STATE_SETTINGS})
    with torch.no_grad():
        for name in _STATE_BUFFERS:
            getattr(post_processor, name).fill_(float(state[name]))
    return post_processor

"""Metrics a benchmark configuration can add to the default ones (``extra_metrics``)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from anomalib import metrics

__all__ = ["AUPIMO"]

logger = logging.getLogger(__name__)


class AUPIMO(metrics.AUPIMO):  # type: ignore[misc]
    """anomalib's AUPIMO (mean over the anomalous images), ``nan`` where it is undefined instead of an error.

    AUPIMO integrates the per-image overlap over false positive rates 1e-5..1e-4 of the normal pixels, which a
    small test split (fewer than about 100 000 normal pixels) cannot reach; anomalib then raises, and the job would
    lose its other metrics too.
    """

    def compute(self) -> Any:
        """The mean AUPIMO of the anomalous images, or ``nan`` where anomalib cannot compute it."""
        try:
            return super().compute()
        except ValueError as error:
            logger.warning("AUPIMO is undefined on these maps (%s); it is reported as nan.", error)
            return torch.tensor(float("nan"))

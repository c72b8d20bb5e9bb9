"""The progress of a run, counted by a Lightning callback that anomalib's command line adds to the run's trainer."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from anomalib_anomalyclip.app.service import RUNNING

__all__ = ["ProgressCallback"]


class ProgressCallback(Callback):
    """Counts the predicted images of a run into its :class:`.service.BatchProgress` (found by ``key``).

    Args:
        key: The run's key in :data:`.service.RUNNING`.
    """

    def __init__(self, key: str) -> None:
        self.key = key

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The predict loop has started (the model is built)."""
        del trainer, pl_module
        RUNNING[self.key].stage = "Scoring"

    def on_predict_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, *_: int
    ) -> None:
        """Count the batch's images (after ``batch``: the batch and dataloader indices)."""
        del trainer, pl_module, outputs
        RUNNING[self.key].done += len(batch.image_path)

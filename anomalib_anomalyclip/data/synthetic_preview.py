"""A picture of the synthetic training samples: :class:`SyntheticPreview` writes it at the start of ``fit``.

Each synthetic anomalous image (:mod:`~anomalib_anomalyclip.data.anomaly_synthesis`) is drawn above the same image
with its mask tinted red, so users see what the model is taught to call a defect.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from lightning.pytorch import Callback, LightningModule, Trainer
from PIL import Image

from .anomaly_synthesis import SYNTHETIC_LABEL

__all__ = ["PREVIEW_NAME", "SyntheticPreview", "write_preview"]

logger = logging.getLogger(__name__)


def _tile(image_path: str, mask_path: str, size: int) -> np.ndarray:
    """The image above the image with its mask tinted red, (2 * size, size, 3) uint8."""
    image = Image.open(image_path).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    mask = Image.open(mask_path).convert("L").resize((size, size), Image.Resampling.NEAREST)
    pixels = np.asarray(image, dtype=np.float32)
    tinted = pixels.copy()
    inside = np.asarray(mask) > 0
    tinted[inside] = 0.5 * tinted[inside] + 0.5 * np.array([255.0, 0.0, 0.0])
    return np.concatenate([pixels, tinted]).astype(np.uint8)


def write_preview(pairs: Sequence[tuple[str, str]], path: Path, columns: int = 8, tile: int = 128) -> Path:
    """A PNG grid of synthetic samples: each image above the same image with its mask in red.

    Args:
        pairs: ``(image, mask)`` paths; ``2 * columns`` of them, evenly spread, are shown.
        path: the PNG to write (its folder is created).
        columns: tiles per row.
        tile: side of a tile in pixels.

    Returns:
        ``path``.
    """
    pairs = list(pairs)
    pairs = [pairs[int(i)] for i in np.unique(np.linspace(0, len(pairs) - 1, 2 * columns).round())]
    columns = min(columns, len(pairs))
    tiles = [_tile(image, mask, tile) for image, mask in pairs]
    tiles += [np.zeros_like(tiles[0])] * (-len(tiles) % columns)
    rows = [np.concatenate(tiles[start : start + columns], axis=1) for start in range(0, len(tiles), columns)]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows)).save(path)
    return path


PREVIEW_NAME = "synthetic_anomalies.png"


class SyntheticPreview(Callback):
    """At the start of ``fit``, write a PNG grid of the synthetic training samples with their masks.

    The file, :data:`PREVIEW_NAME`, goes next to the checkpoints (the trainer's checkpoint folder, else its
    ``default_root_dir``), so users see what the model was taught to call a defect. Nothing is written when the
    training data hold no synthetic anomalies.
    """

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write the preview (rank 0 only)."""
        del pl_module
        samples = getattr(getattr(trainer.datamodule, "train_data", None), "samples", None)
        if samples is None or "label" not in getattr(samples, "columns", ()) or not trainer.is_global_zero:
            return
        rows = samples[samples["label"] == SYNTHETIC_LABEL]
        if rows.empty:
            return
        callback = trainer.checkpoint_callback
        folder = Path(callback.dirpath) if callback is not None and callback.dirpath else Path(trainer.default_root_dir)
        path = write_preview(list(zip(rows["image_path"], rows["mask_path"], strict=True)), folder / PREVIEW_NAME)
        logger.info("Synthetic anomalies: preview of the training samples written to %s.", path)

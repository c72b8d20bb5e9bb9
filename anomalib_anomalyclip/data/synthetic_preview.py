"""A picture of the synthetic training samples: :class:`SyntheticPreview` writes it at the start of ``fit``.

Each synthetic anomalous image (:mod:`~anomalib_anomalyclip.data.anomaly_synthesis`) is drawn above the same image
with its mask tinted red, so users see what the model is taught to call a defect.

It also warns (:func:`warn_on_background`) when a synthetic source largely teaches the background: when more than
:data:`BACKGROUND_SHARE` of its anomalous pixels fall on the plain background of the normal images they were made
from (:func:`plain_background`: near-uniform neighbourhoods of the border's colour, in images whose border is mostly
such), as for an object photographed on a plain backdrop. Perlin anomalies are placed anywhere, so the share is
about the background's share of the image. The rule is a hint to look at the preview, not a verdict: a product
with a plain surface that fills most of the border counts as background too.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch import Callback, LightningModule, Trainer
from PIL import Image

from anomalib_anomalyclip.data.anomaly_synthesis import SYNTHETIC_LABEL, read_index

__all__ = [
    "BACKGROUND_SHARE",
    "PREVIEW_NAME",
    "UNIFORM_STD",
    "SyntheticPreview",
    "background_share",
    "plain_background",
    "warn_on_background",
    "write_preview",
]

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
UNIFORM_STD = 0.03
"""Standard deviation of a colour channel (in [0, 1]) below which a neighbourhood counts as near-uniform."""
BORDER_TOLERANCE = 0.05
"""Largest difference (in [0, 1], per channel) between a background pixel's local mean and the border's median."""
PLAIN_BORDER = 0.8
"""Share of an image's border that must be background-like for the image to count as having a plain background."""
PLAIN_SURFACE = 0.9
"""Share of background-like pixels above which an image is a plain surface (no background to tell apart)."""
BACKGROUND_SHARE = 0.35
"""Share of anomalous pixels on a plain background above which :class:`SyntheticPreview` warns."""


def _box_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean over ``window`` x ``window`` neighbourhoods (edges reflected), same shape as ``values``."""
    padded = np.pad(values, window // 2, mode="reflect")
    sums = np.pad(padded.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    total = sums[window:, window:] - sums[:-window, window:] - sums[window:, :-window] + sums[:-window, :-window]
    return total / window**2


def plain_background(image_path: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """Boolean (H, W) map of the image's plain background (all false when it has none).

    A pixel is background-like when its neighbourhood (a sixteenth of the image's side) is near-uniform (standard
    deviation of every colour channel below :data:`UNIFORM_STD`) and its mean colour is within
    :data:`BORDER_TOLERANCE` of the median colour of the image's border, in every channel. The image has a plain
    background when at least :data:`PLAIN_BORDER` of its border pixels are background-like (a texture's border
    crosses its pattern) and at most :data:`PLAIN_SURFACE` of the image is (else it is a plain surface).
    """
    image = Image.open(image_path).convert("RGB")
    if size is not None and image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float64) / 255.0
    window = max(3, min(pixels.shape[:2]) // 16) | 1
    mean = np.stack([_box_mean(channel, window) for channel in pixels.transpose(2, 0, 1)], axis=-1)
    squares = np.stack([_box_mean(channel**2, window) for channel in pixels.transpose(2, 0, 1)], axis=-1)
    deviation = np.sqrt(np.maximum(squares - mean**2, 0.0)).max(axis=-1)
    border = np.median(np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]), axis=0)
    background = (deviation < UNIFORM_STD) & (np.abs(mean - border).max(axis=-1) < BORDER_TOLERANCE)
    edge = np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]])
    if edge.mean() < PLAIN_BORDER or background.mean() > PLAIN_SURFACE:
        return np.zeros_like(background)
    return background


def background_share(pairs: Sequence[tuple[str, str]], limit: int = 32) -> float:
    """Share of the anomalous pixels that lie on the plain background of the normal images they were made from.

    Args:
        pairs: ``(normal image, mask)`` paths, the mask of the anomaly made from that image.
        limit: at most this many pairs, evenly spread, are read.

    Returns:
        The share in [0, 1] (0 when the masks are empty).
    """
    pairs = list(pairs)
    pairs = [pairs[int(i)] for i in np.unique(np.linspace(0, len(pairs) - 1, min(limit, len(pairs))).round())]
    flat = total = 0
    for image_path, mask_path in pairs:
        mask = np.asarray(Image.open(mask_path).convert("L")) > 0
        flat += int((plain_background(image_path, (mask.shape[1], mask.shape[0])) & mask).sum())
        total += int(mask.sum())
    return flat / total if total else 0.0


def _normal_images(image_paths: Sequence[str]) -> dict[str, str]:
    """Synthetic image -> the normal image it was made from, read from the generated folders' indexes."""
    found: dict[str, str] = {}
    for folder in {Path(path).parent.parent for path in image_paths}:
        found.update({image: source for image, _, source in (read_index(folder) or {"samples": []})["samples"]})
    return found


def warn_on_background(rows: Any, sources: Sequence[Any]) -> None:
    """Warn for every source whose synthetic anomalies fall largely on a plain background (see the module docstring).

    Args:
        rows: the synthetic training samples (columns ``image_path``, ``mask_path``, ``source``).
        sources: the datamodule's source specifications (their ``label`` names the source).
    """
    normal = _normal_images(list(rows["image_path"]))
    labels = {spec.index: spec.label for spec in sources}
    for index, group in rows.groupby("source"):
        pairs = [(normal[i], m) for i, m in zip(group["image_path"], group["mask_path"], strict=True) if i in normal]
        share = background_share(pairs) if pairs else 0.0
        if share > BACKGROUND_SHARE:
            logger.warning(
                "Synthetic anomalies of %s: %.0f %% of their anomalous pixels lie on a plain, near-uniform "
                "background of the normal images, so the prompts may learn to call that background defective. "
                "With normal images only, try few-shot first (--model.k_shot 4); else crop the images to the "
                "product or blank the background out (a foreground mask: the synthetic source has no foreground "
                "option), and look at %s.",
                labels.get(index, f"sources[{index}]"),
                100 * share,
                PREVIEW_NAME,
            )


class SyntheticPreview(Callback):
    """At the start of ``fit``, write a PNG grid of the synthetic training samples with their masks.

    The file, :data:`PREVIEW_NAME`, goes next to the checkpoints (the trainer's checkpoint folder, else its
    ``default_root_dir``), so users see what the model was taught to call a defect. Nothing is written when the
    training data hold no synthetic anomalies. It then warns about sources whose anomalies mostly fall on a
    near-uniform background (:func:`warn_on_background`).
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
        if "source" in rows.columns:
            warn_on_background(rows, getattr(trainer.datamodule, "sources", ()))

"""What the page offers to download, and the decisions at the page's threshold.

``predictions.csv`` has the columns of ``anomalib predict``'s file (``path``, ``score``, ``decision``;
:class:`~anomalib_anomalyclip.integration.callbacks.PredictionCsvWriter`), with the decisions at the threshold chosen
on the page: at the model's threshold (0.5 on the normalised scale) it is the file the run wrote. The overlays come as
one zip.
"""

from __future__ import annotations

import csv
import zipfile
from collections.abc import Sequence
from pathlib import Path

from anomalib_anomalyclip.app.service import ScoredImage

__all__ = ["MODEL_THRESHOLD", "OVERLAYS_ZIP", "decision", "write_overlay_zip", "write_predictions_csv"]

MODEL_THRESHOLD = 0.5
"""The model's threshold on the normalised score scale (the post-processor maps its threshold there)."""
OVERLAYS_ZIP = "overlays.zip"


def decision(score: float, threshold: float) -> str:
    """``anomalous`` when ``score`` exceeds ``threshold`` by more than the model's decision margin, else ``normal``."""
    from anomalib_anomalyclip.integration.post_processor import (
        DECISION_MARGIN,  # here: the page's modules import no torch before the first run
    )

    return "anomalous" if score > threshold + DECISION_MARGIN else "normal"


def write_predictions_csv(images: Sequence[ScoredImage], threshold: float, folder: Path) -> Path:
    """``folder/predictions.csv``: one row per image, decisions at ``threshold``; the file."""
    from anomalib_anomalyclip.integration.callbacks import CSV_COLUMNS, PREDICTIONS_CSV

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / PREDICTIONS_CSV
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(CSV_COLUMNS)
        writer.writerows([str(image.path), f"{image.score:.6f}", decision(image.score, threshold)] for image in images)
    return path


def write_overlay_zip(images: Sequence[ScoredImage], folder: Path) -> Path:
    """``folder/overlays.zip``: the overlay of each image under the image's name; the file."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / OVERLAYS_ZIP
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for image in images:
            if image.overlay is not None:
                archive.write(image.overlay, arcname=image.name)
    return path

"""Callbacks that :class:`~anomalib_anomalyclip.AnomalyCLIP` adds to every run (see ``configure_callbacks``).

* :class:`~anomalib_anomalyclip.integration.checkpoints.CheckpointFileCheck`: a ``--ckpt_path`` that is not a readable
  Lightning checkpoint of AnomalyCLIP stops with an error that names the file and says what was expected.
* :class:`AnomalibReaderCheck`: anomalib's own datasets (``MVTecAD``, ``Folder``, ``Visa``... and the
  ``PredictDataset`` behind ``anomalib predict --data <folder>``) read images with ``Image.open(path).convert("RGB")``,
  which clips 16-bit images to white and drops transparency without an error. Before such a dataset is read, every
  file is checked and the run stops with one error that lists the files and the fix, instead of scoring wrong
  pixels. This package's own datasets read with :func:`anomalib_anomalyclip.data.images.read_image` and are skipped.
* :class:`FewShotCheckpoint`: the validation-only ``fit`` of a few-shot model writes ``model.ckpt`` with the bank.
* :class:`~anomalib_anomalyclip.integration.feature_cache.FeatureCacheCallback`: the feature cache of prompt training.
* :class:`PredictionCsvWriter`: ``anomalib predict`` writes ``predictions.csv`` (columns ``path``, ``score``,
  ``decision``) into the run's results folder, next to the ``images/`` folder of overlays; one file for the whole
  run under DDP too (rank 0 merges the ranks' rows).

:class:`ConvertingImageVisualizer`, the model's default visualiser, draws the overlays on the images as
:func:`~anomalib_anomalyclip.data.images.read_image` converts them (anomalib's visualiser re-reads them with PIL's
plain RGB conversion, which shows a 16-bit image as white).
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from itertools import zip_longest
from pathlib import Path
from typing import IO, Any

import torch.distributed as dist
from anomalib.data import PredictDataset
from anomalib.data.datasets.base.image import AnomalibDataset
from anomalib.utils.path import generate_output_filename
from anomalib.visualization import ImageVisualizer
from anomalib.visualization.image.item_visualizer import visualize_image_item
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2.functional import resize

from anomalib_anomalyclip.data.images import READ_WRONGLY, anomalib_reader_problem, check_files, read_image
from anomalib_anomalyclip.data.synthetic_preview import SyntheticPreview
from anomalib_anomalyclip.integration.checkpoints import CheckpointFileCheck
from anomalib_anomalyclip.integration.feature_cache import FeatureCacheCallback

__all__ = [
    "AnomalibReaderCheck",
    "ConvertingImageVisualizer",
    "FewShotCheckpoint",
    "PredictionCsvWriter",
    "merge_rank_rows",
    "model_callbacks",
]

logger = logging.getLogger(__name__)

PREDICTIONS_CSV = "predictions.csv"
CSV_COLUMNS = ("path", "score", "decision")

_UNREADABLE_FIX = "Copy or export these files again, or remove them."
_CONVERSION_FIX = (
    "anomalib's datasets read images with Image.open(path).convert('RGB'). Convert these files to 8-bit RGB PNG or "
    "JPEG. To predict on a folder, use --data anomalib_anomalyclip.data.PredictFolder --data.path <folder> instead "
    "of --data <folder>: it converts 16-bit and transparent images correctly."
)


def _predictions(count: int) -> str:
    return f"{count} prediction{'' if count == 1 else 's'}"


def _reader_fix(problems: Sequence[str]) -> str:
    """The advice that fits ``problems``: unreadable files, files anomalib reads wrongly, or both."""
    wrongly = [READ_WRONGLY in problem for problem in problems]
    if all(wrongly):
        return _CONVERSION_FIX
    return _UNREADABLE_FIX if not any(wrongly) else f"{_UNREADABLE_FIX} {_CONVERSION_FIX}"


def model_callbacks() -> list[Callback]:
    """The callbacks of this module, in the order the model adds them (after anomalib's own components)."""
    return [
        CheckpointFileCheck(),
        AnomalibReaderCheck(),
        PredictionCsvWriter(),
        SyntheticPreview(),
        FeatureCacheCallback(),
        FewShotCheckpoint(),
    ]


class FewShotCheckpoint(Callback):
    """Save a checkpoint after the validation-only ``fit`` of a few-shot model (prompts, references, thresholds).

    anomalib's Engine fits a few-shot model with a validation pass, after which Lightning's checkpoint callback
    writes nothing; this writes ``model.ckpt`` where that callback would (none when it keeps nothing, as with
    ``save_top_k=0``), so that ``test``/``predict``/``export --ckpt_path`` find the bank.
    """

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Save when a few-shot model was validated on its own (not within a fit, not in the sanity check)."""
        if not getattr(pl_module.model, "k_shot", 0) or trainer.state.fn != TrainerFn.VALIDATING:
            return
        callback = trainer.checkpoint_callback
        if trainer.sanity_checking or callback is None or callback.dirpath is None or callback.save_top_k == 0:
            return
        path = Path(callback.dirpath) / f"{callback.filename or 'model'}{callback.FILE_EXTENSION}"
        trainer.save_checkpoint(path)
        logger.info(
            "AnomalyCLIP few-shot checkpoint (prompts, %d references, thresholds): %s", pl_module.model.k_shot, path
        )


class AnomalibReaderCheck(Callback):
    """Stop before anomalib's image reader reads a file it would read wrongly, or could not read.

    Files of ``PredictDataset`` (one's own images) are decoded, which also finds truncated files. Files of
    anomalib's labelled datasets are checked from their headers (fast), decoding only images with an alpha channel.
    Each file is checked once per run.
    """

    def __init__(self) -> None:
        self._checked: set[str] = set()

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Check the validation images."""
        del pl_module
        self._check(trainer.val_dataloaders)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Check the test images."""
        del pl_module
        self._check(trainer.test_dataloaders)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Check the images to predict on."""
        del pl_module
        self._check(trainer.predict_dataloaders)

    def _check(self, dataloaders: Any) -> None:
        for dataset in (loader.dataset for loader in loaders_of(dataloaders)):
            paths, decode = _files_read_by_anomalib(dataset)
            paths = [path for path in paths if path not in self._checked]
            if not paths:
                continue
            problem = partial(anomalib_reader_problem, decode=decode)
            check_files(paths, problem, what=f"images of {type(dataset).__name__}", fix=_reader_fix)
            self._checked.update(paths)


def loaders_of(dataloaders: Any) -> Iterator[DataLoader]:
    """The loaders of a trainer's dataloaders (one loader, a sequence or a mapping of them)."""
    if dataloaders is None:
        return
    if isinstance(dataloaders, DataLoader):
        yield dataloaders
    elif isinstance(dataloaders, dict):
        for loader in dataloaders.values():
            yield from loaders_of(loader)
    elif isinstance(dataloaders, Iterable):
        for loader in dataloaders:
            yield from loaders_of(loader)


def _files_read_by_anomalib(dataset: object) -> tuple[list[str], bool]:
    """Image files that anomalib's own item loading reads, and whether to decode them when checking."""
    if isinstance(dataset, PredictDataset) and type(dataset).__getitem__ is PredictDataset.__getitem__:
        return [str(path) for path in dataset.image_filenames], True
    if isinstance(dataset, AnomalibDataset) and type(dataset).__getitem__ is AnomalibDataset.__getitem__:
        return [str(path) for path in dataset.samples["image_path"]], False
    return [], False


class PredictionCsvWriter(Callback):
    """Write one row per predicted image: ``path`` (absolute), ``score`` and ``decision``.

    ``score`` is anomalib's normalised image score in [0, 1] (``pred_score`` after the post-processor) and
    ``decision`` is ``anomalous`` or ``normal`` (``pred_label``: anomalous when the normalised score exceeds the
    normalised threshold, 0.5, by more than 1e-5; a score at it is normal). Eager models and exported graphs apply
    this one rule (:meth:`.ProbabilityPostProcessor._apply_threshold`, inside the graph for an export), and
    ``ExportedAnomalyCLIP`` writes this file too. Rows are written as batches finish, so a stopped run keeps what
    it predicted. The file is ``<trainer.default_root_dir>/predictions.csv``.

    With several processes (``--trainer.strategy ddp``) each rank writes its rows to ``predictions.rank<N>.csv`` as
    it goes; when prediction ends, rank 0 gathers every rank's rows, writes them to the one ``predictions.csv`` (in
    the dataset's order for anomalib's samplers, each path once: a sampler that pads repeats some images) and the
    part files are removed. A stopped run keeps its part files.
    """

    def __init__(self) -> None:
        self.path: Path | None = None
        self._part: Path | None = None
        self._file: IO[str] | None = None
        self._writer: Any = None
        self._rows: list[list[str]] = []

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Open the CSV file (this rank's part file with several processes) and write its header."""
        del pl_module
        folder = Path(trainer.default_root_dir)
        self.path = folder / PREDICTIONS_CSV
        self._part = self.path if trainer.world_size == 1 else folder / f"predictions.rank{trainer.global_rank}.csv"
        self._part.parent.mkdir(parents=True, exist_ok=True)
        self._file = self._part.open("w", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)
        self._writer.writerow(CSV_COLUMNS)
        self._rows = []

    def on_predict_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Append the batch's rows (the outputs are already normalised and thresholded by the post-processor)."""
        del trainer, pl_module, batch_idx, dataloader_idx
        if self._writer is None:
            return
        result = outputs if getattr(outputs, "pred_score", None) is not None else batch
        for path, score, label in _rows(result):
            row = [path, f"{score:.6f}", label]
            self._writer.writerow(row)
            self._rows.append(row)
        self._file.flush()

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Close the file; with several processes, merge the ranks' rows into ``predictions.csv`` on rank 0."""
        del pl_module
        if not self._close():
            return
        if self._part == self.path:
            logger.info("Wrote %s to %s", _predictions(len(self._rows)), self.path)
            return
        gathered = _gather_to_rank_zero(self._rows, trainer.world_size)
        if gathered is None:  # no process group to gather through: the part files stay
            logger.info("Wrote %s to %s", _predictions(len(self._rows)), self._part)
            return
        if trainer.global_rank == 0:
            rows = merge_rank_rows(gathered)
            _write_csv(self.path, rows)
            logger.info("Wrote %s from %d processes to %s", _predictions(len(rows)), len(gathered), self.path)
        self._part.unlink(missing_ok=True)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Close the file, keeping the rows written so far (a file of no rows, e.g. a refused run, is removed)."""
        del trainer, pl_module, exception
        if self._close() and not self._rows:
            self._part.unlink(missing_ok=True)

    def _close(self) -> bool:
        if self._file is None:
            return False
        self._file.close()
        self._file = self._writer = None
        return True


def merge_rank_rows(parts: list[list[list[str]]]) -> list[list[str]]:
    """The rows of all ranks as one table: in the dataset's order, each image path once.

    Lightning's distributed samplers give rank ``r`` of ``n`` the items ``r, r + n, r + 2n, ...`` (without shuffling),
    so taking the ranks' rows in turn restores the dataset's order. A padding sampler repeats items to even out the
    ranks; only the first row of a path is kept (rows without a path are all kept).

    Args:
        parts: Each rank's rows, ``[path, score, decision]``, in the order the rank predicted them.

    Returns:
        The merged rows.
    """
    merged: list[list[str]] = []
    seen: set[str] = set()
    for row in (row for turn in zip_longest(*parts) for row in turn if row is not None):
        if row[0] and row[0] in seen:
            continue
        seen.add(row[0])
        merged.append(row)
    return merged


def _gather_to_rank_zero(rows: list[list[str]], world_size: int) -> list[list[list[str]]] | None:
    """Every rank's rows on rank 0 (``[]`` on the other ranks); ``None`` without a process group of that size."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() != world_size:
        return None
    rank = dist.get_rank()
    gathered: list[Any] | None = [None] * world_size if rank == 0 else None
    dist.gather_object(rows, gathered, dst=0)
    return gathered if rank == 0 else []


def _write_csv(path: Path, rows: list[list[str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(rows)


def _rows(result: Any) -> Iterator[tuple[str, float, str]]:
    """``(path, score, decision)`` per image of a post-processed batch."""
    scores = result.pred_score.detach().float().reshape(-1).cpu().tolist()
    labels = result.pred_label
    labels = [None] * len(scores) if labels is None else labels.detach().reshape(-1).cpu().tolist()
    paths = result.image_path or [""] * len(scores)
    for path, score, label in zip(paths, scores, labels, strict=True):
        decision = "" if label is None else ("anomalous" if label else "normal")
        yield (os.path.abspath(path) if path else ""), score, decision


class ConvertingImageVisualizer(ImageVisualizer):
    """The anomalib image visualiser, drawing each overlay on the image as ``read_image`` converts it.

    anomalib's visualiser loads the background of every overlay from ``image_path`` with PIL's plain RGB conversion,
    so a 16-bit image (scored correctly) would be shown white. Everything else (fields, sizes, colours, output
    paths under ``<default_root_dir>/images``) is anomalib's.
    """

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Save one overlay per image of the batch."""
        paths = getattr(batch, "image_path", None)
        if not paths or any(not path for path in paths):  # nothing to re-read: anomalib's own handling
            super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
            return
        if self.output_dir is None:
            self.output_dir = Path(trainer.default_root_dir) / "images"
        datamodule = getattr(trainer, "datamodule", None)
        for item in batch:
            self._save(item, getattr(datamodule, "name", None), getattr(datamodule, "category", None))

    def _save(self, item: Any, dataset_name: str | None, category: str | None) -> None:
        # At the field size already (anomalib resizes every field to it): a 1-pixel-high image would not convert.
        width, height = self.field_size
        image = resize(read_image(item.image_path), [height, width], InterpolationMode.BICUBIC, antialias=True)
        shown = item.update(in_place=False, image=image.clamp(0, 1), image_path=None)
        overlay = visualize_image_item(
            shown,
            fields=self.fields,
            overlay_fields=self.overlay_fields,
            field_size=self.field_size,
            fields_config=self.fields_config,
            overlay_fields_config=self.overlay_fields_config,
            text_config=self.text_config,
        )
        if overlay is not None:
            overlay.save(generate_output_filename(item.image_path, self.output_dir, dataset_name, category))

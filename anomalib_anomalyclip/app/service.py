"""Scoring a batch of images for the page: the same ``anomalib predict`` run as the command line, in-process.

Every run is built by anomalib's own command-line class (``AnomalibCLI`` with ``run=False``) from the model
arguments the app was started with, plus what the page chose: the references as a few-shot source
(``--model.k_shot``, ``--model.few_shot.source``), ``--model.mutual.enabled`` and ``--model.tiling.enabled``.
The images go through :class:`~anomalib_anomalyclip.data.PredictFolder`, and the engine's ``predict`` writes the
overlays and ``predictions.csv`` (:class:`~anomalib_anomalyclip.integration.callbacks.PredictionCsvWriter`) as it does
for ``anomalib predict``; the page reads that file. Nothing of the scoring is repeated here.

Files that the package's reader cannot use are set aside before the run, each with the package's message
(:func:`~anomalib_anomalyclip.data.images.image_problem`), and the others are scored.

Importing this module is light (no torch, Lightning or anomalib) so that the page is served at once; they are
imported by the first run.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import shutil
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anomalib_anomalyclip._registry import register
from anomalib_anomalyclip.errors import AnomalyCLIPError

__all__ = ["RUNNING", "BatchProgress", "BatchRequest", "BatchResult", "BatchScorer", "ModelArguments", "ScoredImage"]

PREDICT_FOLDER = "anomalib_anomalyclip.data.PredictFolder"
DEFAULT_MODEL = "AnomalyCLIP"
EXPORTED_MODEL = "ExportedAnomalyCLIP"

RUNNING: dict[str, BatchProgress] = {}
"""The progress of the running batches, by key, for :class:`.progress.ProgressCallback` (anomalib's command line
builds it from its class path and key)."""


class AppSetupError(AnomalyCLIPError, ValueError):
    """The page's choices cannot make a run (e.g. a switch that an exported model does not have)."""


@dataclass(frozen=True)
class ModelArguments:
    """The model's command-line arguments, as ``anomalib predict`` takes them.

    Attributes:
        words: e.g. ``["--model.prompt_weights", "anomalyclip-mvtec"]``, ``["--ckpt_path", "model.ckpt"]`` or
            ``["--model", "ExportedAnomalyCLIP", "--model.path", "model.xml"]``; ``--model AnomalyCLIP`` is added
            when no ``--model`` is given.
    """

    words: tuple[str, ...]

    @property
    def model_name(self) -> str:
        """The model class given with ``--model`` (``AnomalyCLIP`` when none is)."""
        for word, following in itertools.pairwise(self.words):
            if word == "--model":
                return following.rsplit(".", 1)[-1]
            if word.startswith("--model="):
                return word.split("=", 1)[1].rsplit(".", 1)[-1]
        return DEFAULT_MODEL

    @property
    def exported(self) -> bool:
        """Whether the model is an exported file (fixed: no few-shot or tiling switches; mutual only if exported so)."""
        return self.model_name == EXPORTED_MODEL

    def predict_words(self) -> list[str]:
        """``predict`` with the model's arguments (``--model AnomalyCLIP`` first when no model is named)."""
        named = any(word == "--model" or word.startswith("--model=") for word in self.words)
        return ["predict", *([] if named else ["--model", DEFAULT_MODEL]), *self.words]


@dataclass(frozen=True)
class BatchRequest:
    """One batch as the page gives it.

    Attributes:
        images: The image files to score (uploaded, or from a folder on the server).
        references: Normal reference images: with any, the run is few-shot with ``k`` = their number.
        mutual: Score the images against each other too.
        tiling: Tiled inference (tiles of the model's input size).
    """

    images: Sequence[Path]
    references: Sequence[Path] = ()
    mutual: bool = False
    tiling: bool = False


@dataclass(frozen=True)
class ScoredImage:
    """One row of ``predictions.csv`` with its overlay.

    Attributes:
        name: The file's name (a number is added to a name that came twice in the batch).
        path: Where the run read it (the ``path`` column).
        score: The normalised image score in [0, 1] (the model's threshold is at 0.5).
        decision: ``anomalous`` or ``normal`` at the model's threshold.
        overlay: The overlay the run drew, if any.
    """

    name: str
    path: Path
    score: float
    decision: str
    overlay: Path | None


@dataclass
class BatchResult:
    """What a run gives the page.

    Attributes:
        images: The scored images, in the CSV's order.
        bad_files: ``(file name, the package's message)`` of each file that was not scored.
        folder: The run's results folder (``predictions.csv``, ``images/``).
        error: The one-line message of a run that stopped (then ``images`` is empty).
        k_shot: The number of references used (0: zero-shot).
    """

    images: list[ScoredImage] = field(default_factory=list)
    bad_files: list[tuple[str, str]] = field(default_factory=list)
    folder: Path | None = None
    error: str = ""
    k_shot: int = 0


@dataclass
class BatchProgress:
    """How far a run is, read by the page while it scores.

    Attributes:
        stage: What the run does now, in words.
        done: Images scored so far.
        total: Images to score.
    """

    stage: str = "waiting"
    done: int = 0
    total: int = 0

    def describe(self) -> str:
        """One line for the page, e.g. ``Scoring: 4 / 8 images``."""
        return f"{self.stage}: {self.done} / {self.total} images" if self.total else self.stage


class BatchScorer:
    """Runs ``anomalib predict`` on batches of images for the page, one batch at a time.

    Args:
        arguments: The model's command-line arguments.
        workdir: Where each run gets a folder (the images and references are copied there).
    """

    def __init__(self, arguments: ModelArguments, workdir: Path) -> None:
        self.arguments = arguments
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._runs = itertools.count(1)
        self._lock = threading.Lock()

    def check(self) -> None:
        """Build the model once, as a run would, so that wrong arguments stop the app at start-up.

        Raises:
            AnomalyCLIPError: The arguments cannot make a run (the package's message, or jsonargparse's).
        """
        empty = self.workdir / "start-up-check"
        empty.mkdir(exist_ok=True)
        self._command_line([*self.arguments.predict_words(), "--data", PREDICT_FOLDER, "--data.path", str(empty)])

    def score(self, request: BatchRequest, progress: BatchProgress | None = None) -> BatchResult:
        """Score ``request``'s images (a run of the model's ``predict``); problems come back in the result.

        Args:
            request: The images and the page's switches.
            progress: Updated while the run goes on.
        """
        progress = progress or BatchProgress()
        with self._lock:
            run = self.workdir / f"run-{next(self._runs):03d}"
            result = BatchResult()
            images = _staged(request.images, run / "images", result.bad_files)
            references = _staged(request.references, run / "references", result.bad_files)
            if not images:
                result.error = "No image of the batch can be read (see the files listed)."
                return result
            result.k_shot = len(references)
            progress.stage, progress.total, progress.done = "Loading the model", len(images), 0
            try:
                words = self._run_words(request, run, bool(references))
                result.folder = self._predict(words, run.name, progress)
            except AnomalyCLIPError as error:
                result.error = str(error)
                return result
            result.images = read_predictions(result.folder)
            progress.stage = "Done"
            return result

    def _run_words(self, request: BatchRequest, run: Path, few_shot: bool) -> list[str]:
        """The command line of one run: the app's model arguments, the page's switches, the folder of images."""
        switches = []
        if few_shot:
            switches += ["--model.k_shot", str(len(list((run / "references").iterdir())))]
            switches += ["--model.few_shot.source", str(run / "references")]
        if request.tiling:
            switches += ["--model.tiling.enabled", "true"]  # tiles of the model's input size
        if switches and self.arguments.exported:
            raise AppSetupError(
                "An exported model is fixed when it is exported: few-shot references and tiling cannot be switched "
                "on the page. Start the app with the model's arguments (--model.prompt_weights, --ckpt_path) to use "
                "them, or export a few-shot or tiled model."
            )
        if request.mutual:  # an export scores mutually when it was exported so (ExportedAnomalyCLIP checks)
            switches += ["--model.mutual", "true"] if self.arguments.exported else ["--model.mutual.enabled", "true"]
        data = ["--data", PREDICT_FOLDER, "--data.path", str(run / "images")]
        return [*self.arguments.predict_words(), *switches, *data, "--default_root_dir", str(run / "results")]

    def _predict(self, words: list[str], key: str, progress: BatchProgress) -> Path:
        """Build the run with anomalib's command line and run its engine's ``predict``; the results folder."""
        RUNNING[key] = progress
        callback = json.dumps({"class_path": f"{__package__}.progress.ProgressCallback", "init_args": {"key": key}})
        try:
            cli = self._command_line([*words, "--trainer.callbacks+", callback])
            cli.engine.predict(**cli._prepare_subcommand_kwargs("predict"))
        finally:
            RUNNING.pop(key, None)
        return Path(cli.engine.trainer.default_root_dir)

    @staticmethod
    def _command_line(words: list[str]) -> Any:
        """Anomalib's command line built (not run) from ``words``; its one-line error as an exception."""
        from anomalib.cli import AnomalibCLI

        register()  # the short model names, also when anomalib was first imported by this module
        errors = io.StringIO()
        try:
            with contextlib.redirect_stderr(errors):
                return AnomalibCLI(words, run=False)
        except SystemExit as stop:
            raise AppSetupError(_error_report(errors.getvalue()) or f"The run could not start ({stop}).") from None


def read_predictions(folder: Path) -> list[ScoredImage]:
    """The rows of a run's ``predictions.csv`` (in a run's results ``folder``) with their overlays (``images/``)."""
    from anomalib_anomalyclip.integration.callbacks import PREDICTIONS_CSV

    overlays = {path.name: path for path in (folder / "images").rglob("*") if path.is_file()}
    with (folder / PREDICTIONS_CSV).open(newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    return [
        ScoredImage(
            name=Path(row["path"]).name,
            path=Path(row["path"]),
            score=float(row["score"]),
            decision=row["decision"],
            overlay=overlays.get(Path(row["path"]).name),
        )
        for row in rows
    ]


def _error_report(output: str) -> str:
    """The error that anomalib's command line printed (the package's ``ERROR:`` or jsonargparse's ``error:``)."""
    lines = output.splitlines()
    start = next((index for index, line in enumerate(lines) if line.lower().startswith("error: ")), None)
    return "" if start is None else "\n".join(lines[start:]).strip()[len("error: ") :]


def _staged(files: Sequence[Path], folder: Path, bad_files: list[tuple[str, str]]) -> list[Path]:
    """Copy the readable ``files`` into ``folder`` (names made unique); the copies.

    Unreadable files are added to ``bad_files`` with the package's message, and left out.
    """
    from anomalib_anomalyclip.data.images import image_problem

    folder.mkdir(parents=True, exist_ok=True)
    staged: list[Path] = []
    for index, source in enumerate(Path(file) for file in files):
        problem = image_problem(source)
        if problem is not None:
            bad_files.append((source.name, problem.replace(str(source), source.name)))
            continue
        target = folder / source.name
        if target.exists():
            target = folder / f"{source.stem}-{index}{source.suffix}"
        shutil.copyfile(source, target)
        staged.append(target)
    return staged

"""Run a benchmark grid over anomalib's Engine, one model on one category at a time.

Each evaluation builds a fresh datamodule and model, calls ``Engine.fit`` (fitting for one-class models such as
PatchCore; a validation pass that collects normalisation and thresholds for zero-shot models, except zero-shot
AnomalyCLIP, which needs neither and so scores each category once) and then tests. Models with a ``train`` section
learn their prompts once, before any evaluation, and every evaluation of that model loads the saved checkpoint
through ``prompt_weights``. An AnomalyCLIP model is the exception to "fresh": its CLIP weights
and prompts do not depend on the category, so it is built once per model entry and dataset and reused for the
following categories (rebuilding reloads about 1 GB of CLIP weights). A failure (missing category folder, weights
that cannot be loaded offline, out of memory, ...) becomes a failed row with its reason and the rest of the grid still
runs; the full tracebacks go to ``failures.log`` in the output folder.
"""

from __future__ import annotations

import gc
import importlib
import re
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, TextIO

from .config import BenchmarkConfig, BenchmarkConfigError, DatasetSpec, Job, ModelSpec
from .results import FAILED, METRICS, OK, JobResult, metrics_from_test_output

__all__ = ["BenchmarkRunner", "Progress", "check_classes", "instantiate", "resolve_class"]

PROMPT_WEIGHTS_ARG = "prompt_weights"
"""Model argument that receives the checkpoint of a ``train`` step."""

_MODEL_MODULE = "anomalib.models"
_DATA_MODULE = "anomalib.data"
_TRAIN, _EVALUATE = "train", "evaluate"
_ENGINE_DEFAULTS: dict[str, Any] = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}


# --------------------------------------------------------------------------------------------------------------------
# Building objects from class paths
# --------------------------------------------------------------------------------------------------------------------


def resolve_class(class_path: str, default_module: str) -> type:
    """The class named by a short name (looked up in ``default_module``) or a full ``package.module.Class`` path.

    Args:
        class_path: ``Patchcore`` or ``anomalib_anomalyclip.data.AuxiliaryDataModule``.
        default_module: Module searched for short names.

    Returns:
        The class.

    Raises:
        ValueError: If the class cannot be found.
    """
    module_name, _, name = class_path.rpartition(".")
    module_name = module_name or default_module
    try:
        value = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as error:
        msg = f"Cannot find class {class_path!r} (looked for {name!r} in module {module_name!r}): {error}"
        raise ValueError(msg) from error
    if not isinstance(value, type):
        msg = f"{class_path!r} is not a class."
        raise ValueError(msg)
    return value


def instantiate(spec: Mapping[str, Any], default_module: str, **overrides: Any) -> Any:
    """Build ``class_path(**init_args, **overrides)``; argument values with a ``class_path`` are built first.

    Args:
        spec: ``{"class_path": ..., "init_args": {...}}``.
        default_module: Module searched for a short ``class_path`` (nested specs need full class paths).
        **overrides: Arguments that replace those of ``init_args``.

    Returns:
        The object.
    """
    cls = resolve_class(spec["class_path"], default_module)
    arguments = {key: _build_value(value) for key, value in dict(spec.get("init_args") or {}).items()}
    return cls(**{**arguments, **overrides})


def _build_value(value: Any) -> Any:
    if isinstance(value, Mapping) and "class_path" in value:
        return instantiate(value, default_module="builtins")
    if isinstance(value, list):
        return [_build_value(item) for item in value]
    return value


def check_classes(config: BenchmarkConfig) -> None:
    """Resolve every model and datamodule class of ``config`` (imports anomalib; builds nothing).

    Raises:
        BenchmarkConfigError: Listing every class path that cannot be found.
    """
    _register_anomalyclip()
    wanted = [(model.class_path, _MODEL_MODULE) for model in config.models]
    wanted += [(model.train_data["class_path"], _DATA_MODULE) for model in config.models if model.train_data]
    wanted += [(dataset.class_path, _DATA_MODULE) for dataset in config.datasets]
    problems = []
    for class_path, module in dict.fromkeys(wanted):
        try:
            resolve_class(class_path, module)
        except ValueError as error:
            problems.append(str(error))
    if problems:
        raise BenchmarkConfigError("\n".join(problems))


def build_evaluator(levels: Sequence[str], extra_metrics: Sequence[str] = ()) -> Any:
    """AnomalyCLIP's evaluator (image AUROC/AP/F1-max, pixel AUROC/AUPRO/F1-max) restricted to ``levels``.

    Every model of a benchmark gets this evaluator, so that all report the same metrics. ``extra_metrics``
    (``AUPIMO``: anomalib's mean AUPIMO of the anomalous images) are added at their level.
    """
    from anomalib.metrics import Evaluator

    from anomalib_anomalyclip.integration.lightning_model import AnomalyCLIP

    metrics = [
        metric for metric in AnomalyCLIP.configure_evaluator().test_metrics if metric.name.split("_")[0] in levels
    ]
    if "AUPIMO" in extra_metrics and "pixel" in levels:
        from .extra_metrics import AUPIMO

        metrics.append(AUPIMO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False))
    return Evaluator(test_metrics=metrics)


# --------------------------------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------------------------------


class Progress:
    """One line per step on a stream: position, what runs, elapsed time and a rough ETA.

    Steps are of kinds (trainings, evaluations) that take very different times; the ETA assumes that each remaining
    step takes as long as the finished steps of its kind did on average (of any kind while none of its kind is done).

    Args:
        steps: Number of steps by kind, e.g. ``{"train": 2, "evaluate": 30}``.
        stream: Where the lines go.
        clock: Time source (seconds).
    """

    def __init__(
        self, steps: Mapping[str, int], stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.remaining = dict(steps)
        self.total = sum(steps.values())
        self.stream = stream or sys.stderr
        self.clock = clock
        self.started = clock()
        self.done = 0
        self._durations: dict[str, list[float]] = {kind: [] for kind in steps}
        self._step_started: float | None = None

    def start(self, what: str) -> None:
        """Announce the next step."""
        self._step_started = self.clock()
        self._write(f"{self._position(self.done + 1)} {what} | elapsed {self._elapsed()} | ETA {self._eta()}")

    def finish(self, what: str, outcome: str, kind: str) -> None:
        """Report the outcome of the current step (or of a step that did not run, without :meth:`start`)."""
        duration = 0.0 if self._step_started is None else self.clock() - self._step_started
        self._step_started = None
        self._durations[kind].append(duration)
        self.remaining[kind] -= 1
        self.done += 1
        self._write(f"{self._position(self.done)} {what}: {outcome}")

    def _position(self, index: int) -> str:
        return f"[{index:>{len(str(self.total))}}/{self.total}]"

    def _elapsed(self) -> str:
        return _duration(self.clock() - self.started)

    def _eta(self) -> str:
        finished = [duration for durations in self._durations.values() for duration in durations]
        if not finished:
            return "?"
        overall = sum(finished) / len(finished)
        seconds = sum(
            count * (sum(self._durations[kind]) / len(self._durations[kind]) if self._durations[kind] else overall)
            for kind, count in self.remaining.items()
        )
        return _duration(seconds)

    def _write(self, line: str) -> None:
        print(line, file=self.stream, flush=True)


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


# --------------------------------------------------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------------------------------------------------


class BenchmarkRunner:
    """Run every job of a configuration and collect one :class:`JobResult` per model x category.

    Args:
        config: The benchmark configuration.
        stream: Where progress lines go (default: standard error).
        on_result: Called with all results so far after each evaluation (e.g. to rewrite the tables).
    """

    def __init__(
        self,
        config: BenchmarkConfig,
        stream: TextIO | None = None,
        on_result: Callable[[list[JobResult]], None] | None = None,
    ) -> None:
        self.config = config
        self.stream = stream or sys.stderr
        self.on_result = on_result
        self.output_dir = Path(config.output_dir)
        self._checkpoints: dict[int, Path] = {}
        self._broken_models: dict[int, str] = {}
        self._reusable_model: tuple[tuple[int, str], Any] | None = None

    def run(self) -> list[JobResult]:
        """Train the models that need it, then evaluate every job.

        Returns:
            One result per job, in job order.
        """
        _register_anomalyclip()
        jobs = self.config.jobs()
        trained = self.config.trained_models()
        progress = Progress({_TRAIN: len(trained), _EVALUATE: len(jobs)}, self.stream)
        for model in trained:
            self._train(model, progress)
        results: list[JobResult] = []
        for job in jobs:
            results.append(self._evaluate(job, progress))
            if self.on_result is not None:
                self.on_result(list(results))
        return results

    # -- training --------------------------------------------------------------------------------------------------

    def checkpoint_path(self, model: ModelSpec) -> Path:
        """Where the trained checkpoint of ``model`` is saved."""
        return self.output_dir / "prompts" / f"{model.index:02d}_{_slug(model.name)}.ckpt"

    def _train(self, model: ModelSpec, progress: Progress) -> None:
        """Learn the prompts of ``model`` once; on failure, every evaluation of it fails with the reason."""
        what = f"train {model.name} on {model.train_data['class_path'].rsplit('.', 1)[-1]}"
        progress.start(what)
        started = time.monotonic()
        try:
            self._checkpoints[model.index] = self._fit_and_save(model)
        except Exception as error:
            self._record_failure(what, error)
            reason = _reason(error)
            self._broken_models[model.index] = f"training failed: {reason}"
            progress.finish(what, f"FAILED after {time.monotonic() - started:.1f} s: {reason}", _TRAIN)
        else:
            outcome = f"done in {time.monotonic() - started:.1f} s -> {self.checkpoint_path(model)}"
            progress.finish(what, outcome, _TRAIN)
        finally:
            _release_memory()

    def _fit_and_save(self, model_spec: ModelSpec) -> Path:
        _seed(self.config.seed)
        datamodule = instantiate(model_spec.train_data, _DATA_MODULE)
        model = self._build_model(model_spec, levels=("image", "pixel"))
        engine = self._engine(self.output_dir / "runs" / "train")
        engine.fit(model, datamodule=datamodule)
        path = self.checkpoint_path(model_spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        engine.trainer.save_checkpoint(path)
        return path

    # -- evaluation ------------------------------------------------------------------------------------------------

    def _evaluate(self, job: Job, progress: Progress) -> JobResult:
        """Run one job and turn any failure into a failed result."""
        what = str(job)
        broken = self._broken_models.get(job.model.index)
        if broken is not None:
            progress.finish(what, f"skipped: {_shorten(broken, 120)}", _EVALUATE)
            return self._result(job, FAILED, error=broken)
        progress.start(what)
        started = time.monotonic()
        try:
            metrics = self._run_job(job)
        except Exception as error:
            self._reusable_model = None  # its state after the failure is unknown
            self._record_failure(what, error)
            reason = self._broken_models.get(job.model.index, _reason(error))
            seconds = time.monotonic() - started
            progress.finish(what, f"FAILED after {seconds:.1f} s: {reason}", _EVALUATE)
            return self._result(job, FAILED, seconds=seconds, error=reason)
        finally:
            _release_memory()
        seconds = time.monotonic() - started
        progress.finish(what, f"ok in {seconds:.1f} s ({_summary(metrics)})", _EVALUATE)
        return self._result(job, OK, metrics=metrics, seconds=seconds)

    def _run_job(self, job: Job) -> dict[str, float]:
        _seed(self.config.seed)
        datamodule = self._build_datamodule(job.dataset, job.category)
        model = self._model_for(job)
        validate = _needs_validation(model)
        engine = self._engine(self.output_dir / "runs" / _slug(job.model.name), validate=validate)
        engine.fit(model, datamodule=datamodule)  # a zero-shot model's fit is only the validation pass
        output = engine.trainer.test(model, datamodule=datamodule, verbose=False)
        metrics = metrics_from_test_output(output[0] if output else {}, job.dataset.levels)
        if not metrics:
            msg = f"the test run logged none of the expected metrics (it logged {sorted(output[0]) if output else []})"
            raise RuntimeError(msg)
        return metrics

    def _build_datamodule(self, dataset: DatasetSpec, category: str | None) -> Any:
        extra = {} if category is None else {"category": category}
        if not dataset.download:
            _check_dataset_folder(dataset, category)
        return instantiate({"class_path": dataset.class_path, "init_args": dataset.init_args}, _DATA_MODULE, **extra)

    def _model_for(self, job: Job) -> Any:
        """The job's model: AnomalyCLIP is reused from the previous job of the same model entry and dataset."""
        key = (job.model.index, job.dataset.name)
        if self._reusable_model is not None and self._reusable_model[0] == key:
            return self._reusable_model[1]
        self._reusable_model = None  # at most one kept: the previous entry's CLIP is freed before building
        _release_memory()
        model = self._build_model_once(job)
        if _is_anomalyclip(model):
            self._reusable_model = (key, model)
        return model

    def _build_model_once(self, job: Job) -> Any:
        """Build the job's model; a model that cannot be built is not tried again for its other categories."""
        try:
            return self._build_model(job.model, job.dataset.levels)
        except Exception as error:
            self._broken_models[job.model.index] = f"model could not be built: {_reason(error)}"
            raise

    def _build_model(self, model: ModelSpec, levels: Sequence[str]) -> Any:
        overrides: dict[str, Any] = {}
        if "evaluator" not in model.init_args:
            overrides["evaluator"] = build_evaluator(levels, self.config.extra_metrics)
        if "visualizer" not in model.init_args:
            overrides["visualizer"] = False
        if model.index in self._checkpoints:
            overrides[PROMPT_WEIGHTS_ARG] = str(self._checkpoints[model.index])
        from anomalib_anomalyclip.config import is_flat, upgrade

        init_args = dict(model.init_args)
        if resolve_class(model.class_path, _MODEL_MODULE).__name__ == "AnomalyCLIP" and is_flat(init_args):
            init_args = upgrade(init_args)  # the configurations' grids name the flat arguments (dpam_kind=qq)
        return instantiate({"class_path": model.class_path, "init_args": init_args}, _MODEL_MODULE, **overrides)

    def _engine(self, root: Path, validate: bool = True) -> Any:
        """An Engine with the configuration's trainer arguments; ``validate=False`` turns validation passes off."""
        from anomalib.callbacks.checkpoint import ModelCheckpoint
        from anomalib.engine import Engine

        # Checkpoints are not kept (trained prompts are saved explicitly); a callback that saves nothing stops
        # anomalib from adding its own.
        no_checkpoints = [ModelCheckpoint(save_top_k=0, save_last=False)]
        arguments = {**_ENGINE_DEFAULTS, **self.config.trainer, "default_root_dir": root, "callbacks": no_checkpoints}
        if not validate:
            arguments["limit_val_batches"] = 0  # Lightning then skips the validation loop, hooks included
        return Engine(**arguments)

    def _result(self, job: Job, status: str, **fields: Any) -> JobResult:
        return JobResult(job.model.name, job.dataset.name, job.category_label, status, **fields)

    def _record_failure(self, what: str, error: BaseException) -> None:
        """Append the traceback to ``failures.log``."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with (self.output_dir / "failures.log").open("a") as log:
            log.write(f"=== {what}\n{''.join(traceback.format_exception(error))}\n")


def _check_dataset_folder(dataset: DatasetSpec, category: str | None) -> None:
    """Fail early, without a download attempt, when ``<root>`` or ``<root>/<category>`` is missing."""
    root = dataset.init_args.get("root")
    if root is None:
        return
    folder = Path(root) if category is None else Path(root) / category
    if not folder.is_dir():
        what = "dataset" if category is None else "category"
        msg = (
            f"{what} folder {folder} not found. Put the dataset there (layouts: docs/benchmark.md) or point the "
            "dataset's `root` at your copy; with a network, `download: true` on the dataset lets anomalib fetch it"
        )
        raise FileNotFoundError(msg)


def _reason(error: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters)."""
    lines = str(error).strip().splitlines()
    message = next((line.strip() for line in lines if line.strip()), "")
    return _shorten(f"{type(error).__name__}: {message}" if message else type(error).__name__, 300)


def _shorten(text: str, length: int) -> str:
    return text if len(text) <= length else text[: length - 1] + "…"


def _summary(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{metric.title} {metrics[metric.column]:.1f}" for metric in METRICS if metric.column in metrics)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def _seed(seed: int) -> None:
    from lightning.pytorch import seed_everything

    seed_everything(seed, workers=True, verbose=False)


def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _needs_validation(model: Any) -> bool:
    """Whether the test needs anomalib's validation pass first (every model but zero-shot AnomalyCLIP).

    The validation pass of a zero-shot model only collects normalisation statistics and thresholds. AnomalyCLIP
    normalises on its fixed probability scale, and no reported metric depends on thresholds, so without the pass
    each category is scored once, with the same image and anomalib pixel metrics. Its maps then stay a linear
    rescaling of the raw maps (instead of piecewise linear around a validated threshold), which is the scale on
    which the paper's AUPRO (``pixel_AUPRO_paper``) is defined.
    """
    from anomalib import LearningType

    return not (_is_anomalyclip(model) and model.learning_type is LearningType.ZERO_SHOT)


def _is_anomalyclip(model: Any) -> bool:
    from anomalib_anomalyclip.integration.lightning_model import AnomalyCLIP

    return isinstance(model, AnomalyCLIP)


def _register_anomalyclip() -> None:
    """Expose ``AnomalyCLIP`` in ``anomalib.models`` so that the short name resolves."""
    import anomalib_anomalyclip

    anomalib_anomalyclip.register()

"""Benchmark configuration: a grid of models x datasets x categories, read from YAML.

Example (see ``configs/benchmark/`` and ``docs/benchmark.md``)::

    output_dir: results/benchmark/mvtec_from_visa
    seed: 42
    trainer: {accelerator: auto, devices: 1}    # anomalib Engine / Lightning Trainer arguments
    extra_metrics: [AUPIMO]                     # optional: metrics beside the default ones
    datasets:
      - name: MVTec AD
        class_path: MVTecAD                     # anomalib.data name or a full class path
        init_args: {root: ./datasets/MVTecAD, eval_batch_size: 8, num_workers: 4}
        categories: [bottle, cable]             # omit for a dataset without categories
        metrics: [image, pixel]                 # [image] for sets without masks, [pixel] for sets without normals
    models:
      - name: AnomalyCLIP
        class_path: AnomalyCLIP                 # anomalib.models name or a full class path
        init_args:
          prompt_weights: anomalyclip-visa
          dpam_kind: {grid: [vv, qq]}           # one model per value, named "AnomalyCLIP [dpam_kind=qq]"
        train:                                  # optional: learn the prompts once, reuse them for every category
          data: {class_path: anomalib_anomalyclip.data.AuxiliaryDataModule, init_args: {root: ./datasets/visa}}
        datasets: [MVTec AD]                    # optional: run this model on these datasets only

A value ``{class_path: ..., init_args: {...}}`` inside ``init_args`` is instantiated (e.g. a pre-processor).

The file is read by ``jsonargparse`` into the dataclasses :class:`ConfigFile`, :class:`DatasetEntry` and
:class:`ModelEntry`: an unknown key or a value of the wrong type is refused with the parser's message, prefixed
by where it is (``models[1]: ...``). What types cannot say (empty lists, duplicate names, a dataset name that does
not exist) is checked after parsing. ``{grid: [...]}`` values are expanded by anomalib's grid iterator.
"""

from __future__ import annotations

import functools
import json
from argparse import ArgumentError
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import yaml
from jsonargparse import ArgumentParser

__all__ = [
    "METRIC_LEVELS",
    "BenchmarkConfig",
    "BenchmarkConfigError",
    "ConfigFile",
    "DatasetEntry",
    "DatasetSpec",
    "Job",
    "ModelEntry",
    "ModelSpec",
    "expand_grid",
    "load_config",
    "parse_config",
]

MetricLevel = Literal["image", "pixel"]
METRIC_LEVELS: tuple[MetricLevel, ...] = get_args(MetricLevel)
"""Metric levels a dataset can report: image-level (needs normal and anomalous images) and pixel-level (masks)."""

ExtraMetric = Literal["AUPIMO"]
EXTRA_METRICS: tuple[ExtraMetric, ...] = get_args(ExtraMetric)
"""Metrics a configuration can add to the default ones (``extra_metrics``): anomalib's AUPIMO (pixel level)."""

GRID_KEY = "grid"
_Entry = TypeVar("_Entry")


# --------------------------------------------------------------------------------------------------------------------
# The file's format, as jsonargparse reads it
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ClassEntry:
    """A class and its arguments: ``{class_path: ..., init_args: {...}}``.

    ``init_args`` is a plain mapping: its values (nested class specs and ``{grid: [...]}`` included) are kept as
    written and only built when a run starts.
    """

    class_path: str
    init_args: dict | None = None


@dataclass
class TrainEntry:
    """A model's ``train`` section: the datamodule its prompts are learned on once, before the evaluations."""

    data: ClassEntry


@dataclass
class DatasetEntry(ClassEntry):
    """One entry of ``datasets`` (see :class:`DatasetSpec`); ``metrics`` lists its levels."""

    name: str | None = None
    categories: list[str] | None = None
    metrics: list[MetricLevel] | None = None
    download: bool = False


@dataclass
class ModelEntry(ClassEntry):
    """One entry of ``models`` (see :class:`ModelSpec`); ``datasets`` names the datasets it runs on."""

    name: str | None = None
    train: TrainEntry | None = None
    datasets: list[str] | None = None


@dataclass
class ConfigFile:
    """The top level of the file (see :class:`BenchmarkConfig`).

    ``datasets`` and ``models`` are read entry by entry into :class:`DatasetEntry` and :class:`ModelEntry`: so a
    message says which entry is wrong, and jsonargparse, which takes a list item with a ``class_path`` for a
    subclass spec, reads each entry as the dataclass it is.
    """

    datasets: list[dict]
    models: list[dict]
    output_dir: str | None = None
    seed: int = 42
    trainer: dict | None = None
    extra_metrics: list[ExtraMetric] | None = None


class BenchmarkConfigError(ValueError):
    """The benchmark configuration is invalid."""


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of the grid.

    Attributes:
        name: Name shown in the tables.
        class_path: Datamodule class (an ``anomalib.data`` name or a full class path).
        init_args: Datamodule arguments (``category`` only for a dataset without ``categories``).
        categories: Categories to evaluate; ``(None,)`` for a dataset without categories.
        levels: Metric levels to report, from :data:`METRIC_LEVELS`.
        download: Let the datamodule download a missing category (anomalib's default); ``False`` reports a
            missing category folder as a failure instead.
    """

    name: str
    class_path: str
    init_args: Mapping[str, Any] = field(default_factory=dict)
    categories: tuple[str | None, ...] = (None,)
    levels: tuple[MetricLevel, ...] = METRIC_LEVELS
    download: bool = False


@dataclass(frozen=True)
class ModelSpec:
    """One model of the grid (one point of a model-argument grid).

    Attributes:
        name: Name shown in the tables; grid points append their values, ``"AnomalyCLIP [dpam_kind=qq]"``.
        class_path: Model class (an ``anomalib.models`` name or a full class path).
        init_args: Model arguments.
        train_data: Datamodule spec (``class_path``, ``init_args``) to learn the prompts on once before the
            evaluations; the trained checkpoint is passed to every evaluated model as ``prompt_weights``.
        datasets: Names of the datasets to run this model on; ``None``: all.
        index: Position in the expanded model list (identifies the model when names repeat).
    """

    name: str
    class_path: str
    init_args: Mapping[str, Any] = field(default_factory=dict)
    train_data: Mapping[str, Any] | None = None
    datasets: tuple[str, ...] | None = None
    index: int = 0

    def runs_on(self, dataset: DatasetSpec) -> bool:
        """Whether this model is evaluated on ``dataset``."""
        return self.datasets is None or dataset.name in self.datasets


@dataclass(frozen=True)
class Job:
    """One evaluation: a model on one category of a dataset."""

    model: ModelSpec
    dataset: DatasetSpec
    category: str | None

    @property
    def category_label(self) -> str:
        """Category name for tables: the category, or the dataset name when it has none."""
        return self.category if self.category is not None else self.dataset.name

    def __str__(self) -> str:
        """``model | dataset/category``."""
        where = self.dataset.name if self.category is None else f"{self.dataset.name}/{self.category}"
        return f"{self.model.name} | {where}"


@dataclass(frozen=True)
class BenchmarkConfig:
    """A parsed benchmark configuration.

    Attributes:
        models: Models after grid expansion.
        datasets: Datasets.
        output_dir: Where tables, chart, trained prompts and run folders go.
        seed: Seed set before every training and evaluation.
        trainer: anomalib ``Engine`` (Lightning ``Trainer``) arguments for every run.
        extra_metrics: metrics reported beside the default ones, from :data:`EXTRA_METRICS`.
    """

    models: tuple[ModelSpec, ...]
    datasets: tuple[DatasetSpec, ...]
    output_dir: Path = Path("results/benchmark")
    seed: int = 42
    trainer: Mapping[str, Any] = field(default_factory=dict)
    extra_metrics: tuple[ExtraMetric, ...] = ()

    def jobs(self) -> list[Job]:
        """Every evaluation, dataset by dataset, then model by model, then category by category."""
        return [
            Job(model, dataset, category)
            for dataset in self.datasets
            for model in self.models
            if model.runs_on(dataset)
            for category in dataset.categories
        ]

    def trained_models(self) -> list[ModelSpec]:
        """Models whose prompts are learned before their evaluations (those with at least one job)."""
        evaluated = {job.model.index for job in self.jobs()}
        return [model for model in self.models if model.train_data is not None and model.index in evaluated]

    def select(
        self,
        models: Sequence[str] | None = None,
        datasets: Sequence[str] | None = None,
        categories: Sequence[str] | None = None,
    ) -> BenchmarkConfig:
        """A copy restricted to some models, datasets and categories.

        Args:
            models: Model names (a grid point's full name, or the base name for all its points).
            datasets: Dataset names.
            categories: Category names; datasets without any of them are dropped.

        Returns:
            The restricted configuration.

        Raises:
            BenchmarkConfigError: If a name matches nothing.
        """
        chosen_models = self.models
        if models:
            _check_names(models, [name for model in self.models for name in _model_names(model)], "model")
            chosen_models = tuple(model for model in self.models if set(_model_names(model)) & set(models))
        chosen_datasets = self.datasets
        if datasets:
            _check_names(datasets, [dataset.name for dataset in self.datasets], "dataset")
            chosen_datasets = tuple(dataset for dataset in self.datasets if dataset.name in datasets)
        if categories:
            known = [category for dataset in chosen_datasets for category in dataset.categories if category]
            _check_names(categories, known, "category")
            chosen_datasets = tuple(
                replace(dataset, categories=tuple(c for c in dataset.categories if c in categories))
                for dataset in chosen_datasets
                if set(dataset.categories) & set(categories)
            )
        return replace(self, models=chosen_models, datasets=chosen_datasets)


def _model_names(model: ModelSpec) -> tuple[str, str]:
    """A model's full name and its base name (without the grid suffix)."""
    return model.name, model.name.split(" [", 1)[0]


def _check_names(requested: Sequence[str], known: Sequence[str], what: str) -> None:
    unknown = sorted(set(requested) - set(known))
    if unknown:
        msg = f"Unknown {what} name(s) {unknown}; the configuration has {sorted(set(known))}."
        raise BenchmarkConfigError(msg)


# --------------------------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------------------------


def load_config(path: str | Path) -> BenchmarkConfig:
    """Read a benchmark configuration from a YAML file.

    Args:
        path: The YAML file.

    Returns:
        The parsed configuration.

    Raises:
        BenchmarkConfigError: If the file is missing, not YAML, or not a valid configuration.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"Benchmark configuration {path} does not exist."
        raise BenchmarkConfigError(msg)
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        msg = f"Cannot read {path} as YAML: {error}"
        raise BenchmarkConfigError(msg) from error
    return parse_config(content, source=str(path))


def parse_config(content: Any, source: str = "the configuration") -> BenchmarkConfig:
    """Parse a benchmark configuration from plain data (as loaded from YAML).

    Args:
        content: Mapping with ``datasets``, ``models`` and optionally ``output_dir``, ``seed`` and ``trainer``.
        source: Where the content comes from, for messages.

    Returns:
        The parsed configuration.

    Raises:
        BenchmarkConfigError: On a missing or unknown key, a wrong type, an empty list or grid, or duplicate names.
    """
    top = _parse(ConfigFile, content, source)
    dataset_entries = enumerate(_non_empty(top.datasets, "datasets"))
    datasets = tuple(_dataset_spec(spec, f"datasets[{i}]") for i, spec in dataset_entries)
    _check_unique([dataset.name for dataset in datasets], "dataset")
    models = tuple(_expand_models(_non_empty(top.models, "models"), [dataset.name for dataset in datasets]))
    _check_unique_pairs(models, datasets)
    return BenchmarkConfig(
        models=models,
        datasets=datasets,
        output_dir=Path(top.output_dir or "results/benchmark"),
        seed=top.seed,
        trainer=dict(top.trainer or {}),
        extra_metrics=tuple(dict.fromkeys(top.extra_metrics or ())),
    )


def _parse(entry_type: type[_Entry], content: Any, where: str) -> _Entry:
    """``content`` read into ``entry_type`` by jsonargparse; its message, prefixed by ``where``, on a bad key/type."""
    if not isinstance(content, Mapping):
        msg = f"{where} must be a mapping, got {type(content).__name__}: {content!r}."
        raise BenchmarkConfigError(msg)
    train = content.get("train") if entry_type is ModelEntry else None
    if train is not None and (not isinstance(train, Mapping) or not train):
        # Checked before parsing: how jsonargparse reports an empty section depends on its global settings.
        msg = f"{where}.train needs `data` (a datamodule's class_path and init_args)."
        raise BenchmarkConfigError(msg)
    parser = _parser(entry_type)
    try:
        namespace = parser.instantiate_classes(parser.parse_object(dict(content)))
    except (ArgumentError, TypeError, ValueError) as error:  # jsonargparse's message names the key
        msg = f"{where}: {error}"
        raise BenchmarkConfigError(msg) from error
    return entry_type(**namespace.as_dict())


@functools.cache
def _parser(entry_type: type) -> ArgumentParser:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(entry_type)
    return parser


def _non_empty(entries: list[Any], key: str) -> list[Any]:
    if not entries:
        msg = f"`{key}` must be a non-empty list."
        raise BenchmarkConfigError(msg)
    return entries


def _class_spec(entry: ClassEntry) -> dict[str, Any]:
    return {"class_path": entry.class_path, "init_args": dict(entry.init_args or {})}


def _dataset_spec(content: Any, where: str) -> DatasetSpec:
    entry = _parse(DatasetEntry, content, where)
    init_args = dict(entry.init_args or {})
    if "category" in init_args and entry.categories is not None:
        msg = f"{where}: give either `categories` (one run each) or `init_args.category`, not both."
        raise BenchmarkConfigError(msg)
    if entry.categories is not None and not entry.categories:
        msg = f"{where}: `categories` must be a non-empty list (or left out for a dataset without categories)."
        raise BenchmarkConfigError(msg)
    levels = set(entry.metrics or METRIC_LEVELS)
    return DatasetSpec(
        name=entry.name or entry.class_path.rsplit(".", 1)[-1],
        class_path=entry.class_path,
        init_args=init_args,
        categories=tuple(entry.categories) if entry.categories else (None,),
        levels=tuple(level for level in METRIC_LEVELS if level in levels),
        download=entry.download,
    )


def _expand_models(specs: list[Any], dataset_names: Sequence[str]) -> Iterator[ModelSpec]:
    """Parse model entries and expand their argument grids, numbering the results."""
    expanded = (point for i, spec in enumerate(specs) for point in _model_specs(spec, f"models[{i}]", dataset_names))
    for index, model in enumerate(expanded):
        yield replace(model, index=index)


def _model_specs(content: Any, where: str, dataset_names: Sequence[str]) -> list[ModelSpec]:
    entry = _parse(ModelEntry, content, where)
    if entry.datasets is not None:
        _check_names(entry.datasets, dataset_names, f"dataset ({where}.datasets)")
    name = entry.name or entry.class_path.rsplit(".", 1)[-1]
    return [
        ModelSpec(
            name=name + suffix,
            class_path=entry.class_path,
            init_args=init_args,
            train_data=_class_spec(entry.train.data) if entry.train is not None else None,
            datasets=tuple(entry.datasets) if entry.datasets is not None else None,
        )
        for init_args, suffix in expand_grid(entry.init_args or {}, f"{where}.init_args")
    ]


def expand_grid(init_args: Mapping[str, Any], where: str = "init_args") -> list[tuple[dict[str, Any], str]]:
    """Expand ``{grid: [...]}`` values of top-level arguments into one argument set per combination.

    The combinations are those of anomalib's grid iterator (``get_iterator_from_grid_dict``, as in anomalib's
    benchmark pipeline): the last grid varies fastest. The other arguments are passed on as written.

    Args:
        init_args: Arguments; a value ``{"grid": [a, b]}`` stands for each of ``a`` and ``b``.
        where: Where the arguments are, for messages.

    Returns:
        ``(arguments, name suffix)`` per combination; the suffix names the grid values, ``" [key=a, other=x]"``,
        and is empty without a grid.

    Raises:
        BenchmarkConfigError: If a grid is not a non-empty list.
    """
    grids = {key: value[GRID_KEY] for key, value in init_args.items() if _is_grid(value)}
    if not grids:
        return [(dict(init_args), "")]
    for key, values in grids.items():
        if not isinstance(values, list) or not values:
            msg = f"{where}.{key}.grid must be a non-empty list of values."
            raise BenchmarkConfigError(msg)
    # Imported here: anomalib.pipelines imports every anomalib model, seconds that configurations without a grid skip.
    from anomalib.pipelines.components.utils import get_iterator_from_grid_dict

    points = []
    for chosen in get_iterator_from_grid_dict({key: {GRID_KEY: values} for key, values in grids.items()}):
        chosen = {key: chosen[key] for key in grids}  # in the order of the arguments
        suffix = " [" + ", ".join(f"{key}={_format_value(value)}" for key, value in chosen.items()) + "]"
        points.append(({**init_args, **chosen}, suffix))
    return points


def _is_grid(value: Any) -> bool:
    return isinstance(value, Mapping) and set(value) == {GRID_KEY}


def _format_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _check_unique(names: Sequence[str], what: str) -> None:
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        msg = f"Duplicate {what} name(s) {duplicates}; give each a distinct `name`."
        raise BenchmarkConfigError(msg)


def _check_unique_pairs(models: Sequence[ModelSpec], datasets: Sequence[DatasetSpec]) -> None:
    """A model name may repeat only on disjoint datasets (e.g. other prompts for another dataset)."""
    pairs = [(model.name, dataset.name) for dataset in datasets for model in models if model.runs_on(dataset)]
    duplicates = sorted({pair for pair in pairs if pairs.count(pair) > 1})
    if duplicates:
        msg = (
            f"Model(s) {sorted({name for name, _ in duplicates})} appear twice on the same dataset; give each a "
            "distinct `name`, or restrict them to different datasets with `datasets: [...]`."
        )
        raise BenchmarkConfigError(msg)

"""Benchmark configuration: a grid of models x datasets x categories, read from YAML.

Example (see ``configs/benchmark/`` and ``docs/benchmark.md``)::

    output_dir: results/benchmark/mvtec_from_visa
    seed: 42
    trainer: {accelerator: auto, devices: 1}    # anomalib Engine / Lightning Trainer arguments
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
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "METRIC_LEVELS",
    "BenchmarkConfig",
    "BenchmarkConfigError",
    "DatasetSpec",
    "Job",
    "ModelSpec",
    "expand_grid",
    "load_config",
    "parse_config",
]

METRIC_LEVELS: tuple[str, ...] = ("image", "pixel")
"""Metric levels a dataset can report: image-level (needs normal and anomalous images) and pixel-level (masks)."""

GRID_KEY = "grid"
_TOP_KEYS = frozenset({"output_dir", "seed", "trainer", "datasets", "models"})
_DATASET_KEYS = frozenset({"name", "class_path", "init_args", "categories", "metrics", "download"})
_MODEL_KEYS = frozenset({"name", "class_path", "init_args", "train", "datasets"})
_TRAIN_KEYS = frozenset({"data"})


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
    levels: tuple[str, ...] = METRIC_LEVELS
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
    """

    models: tuple[ModelSpec, ...]
    datasets: tuple[DatasetSpec, ...]
    output_dir: Path = Path("results/benchmark")
    seed: int = 42
    trainer: Mapping[str, Any] = field(default_factory=dict)

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
        BenchmarkConfigError: On a missing or unknown key, a wrong type, or duplicate names.
    """
    content = _mapping(content, source, _TOP_KEYS)
    datasets = tuple(_parse_dataset(spec, f"datasets[{i}]") for i, spec in enumerate(_list(content, "datasets")))
    _check_unique([dataset.name for dataset in datasets], "dataset")
    models = tuple(_expand_models(_list(content, "models"), [dataset.name for dataset in datasets]))
    _check_unique_pairs(models, datasets)
    return BenchmarkConfig(
        models=models,
        datasets=datasets,
        output_dir=Path(content.get("output_dir") or "results/benchmark"),
        seed=int(content.get("seed", 42)),
        trainer=dict(_mapping(content.get("trainer") or {}, "trainer")),
    )


def _mapping(value: Any, where: str, allowed: frozenset[str] | None = None) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        msg = f"{where} must be a mapping, got {type(value).__name__}: {value!r}."
        raise BenchmarkConfigError(msg)
    unknown = sorted(set(value) - allowed) if allowed is not None else []
    if unknown:
        msg = f"{where} has unknown key(s) {unknown}; allowed keys: {sorted(allowed)}."
        raise BenchmarkConfigError(msg)
    return value


def _list(content: Mapping[str, Any], key: str) -> list[Any]:
    value = content.get(key)
    if not isinstance(value, list) or not value:
        msg = f"`{key}` must be a non-empty list."
        raise BenchmarkConfigError(msg)
    return value


def _class_path(spec: Mapping[str, Any], where: str) -> str:
    class_path = spec.get("class_path")
    if not isinstance(class_path, str) or not class_path:
        msg = f"{where} needs a `class_path` (a short name such as Patchcore, or a full class path)."
        raise BenchmarkConfigError(msg)
    return class_path


def _init_args(spec: Mapping[str, Any], where: str) -> dict[str, Any]:
    return dict(_mapping(spec.get("init_args") or {}, f"{where}.init_args"))


def _parse_dataset(spec: Any, where: str) -> DatasetSpec:
    spec = _mapping(spec, where, _DATASET_KEYS)
    class_path = _class_path(spec, where)
    init_args = _init_args(spec, where)
    categories = spec.get("categories")
    if "category" in init_args and categories is not None:
        msg = f"{where}: give either `categories` (one run each) or `init_args.category`, not both."
        raise BenchmarkConfigError(msg)
    if categories is not None and (not isinstance(categories, list) or not categories):
        msg = f"{where}: `categories` must be a non-empty list (or left out for a dataset without categories)."
        raise BenchmarkConfigError(msg)
    levels = tuple(spec.get("metrics") or METRIC_LEVELS)
    if not set(levels) <= set(METRIC_LEVELS):
        msg = f"{where}: `metrics` must list levels from {list(METRIC_LEVELS)}, got {list(levels)}."
        raise BenchmarkConfigError(msg)
    return DatasetSpec(
        name=str(spec.get("name") or class_path.rsplit(".", 1)[-1]),
        class_path=class_path,
        init_args=init_args,
        categories=tuple(str(category) for category in categories) if categories else (None,),
        levels=tuple(level for level in METRIC_LEVELS if level in levels),
        download=bool(spec.get("download", False)),
    )


def _expand_models(specs: list[Any], dataset_names: Sequence[str]) -> Iterator[ModelSpec]:
    """Parse model entries and expand their argument grids, numbering the results."""
    expanded = (point for i, spec in enumerate(specs) for point in _parse_model(spec, f"models[{i}]", dataset_names))
    for index, model in enumerate(expanded):
        yield replace(model, index=index)


def _parse_model(spec: Any, where: str, dataset_names: Sequence[str]) -> list[ModelSpec]:
    spec = _mapping(spec, where, _MODEL_KEYS)
    class_path = _class_path(spec, where)
    name = str(spec.get("name") or class_path.rsplit(".", 1)[-1])
    datasets = spec.get("datasets")
    if datasets is not None:
        _check_names(datasets, dataset_names, f"dataset ({where}.datasets)")
    train_data = _parse_train(spec.get("train"), f"{where}.train")
    return [
        ModelSpec(
            name=name + suffix,
            class_path=class_path,
            init_args=init_args,
            train_data=train_data,
            datasets=tuple(datasets) if datasets is not None else None,
        )
        for init_args, suffix in expand_grid(_init_args(spec, where))
    ]


def _parse_train(spec: Any, where: str) -> Mapping[str, Any] | None:
    if spec is None:
        return None
    data = _mapping(
        _mapping(spec, where, _TRAIN_KEYS).get("data"), f"{where}.data", frozenset({"class_path", "init_args"})
    )
    return {"class_path": _class_path(data, f"{where}.data"), "init_args": _init_args(data, f"{where}.data")}


def expand_grid(init_args: Mapping[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """Expand ``{grid: [...]}`` values of top-level arguments into one argument set per combination.

    Args:
        init_args: Arguments; a value ``{"grid": [a, b]}`` stands for each of ``a`` and ``b``.

    Returns:
        ``(arguments, name suffix)`` per combination; the suffix names the grid values, ``" [key=a, other=x]"``,
        and is empty without a grid.

    Raises:
        BenchmarkConfigError: If a grid is not a non-empty list.
    """
    grid_keys = [key for key, value in init_args.items() if _is_grid(value)]
    for key in grid_keys:
        values = init_args[key][GRID_KEY]
        if not isinstance(values, list) or not values:
            msg = f"init_args.{key}.grid must be a non-empty list of values."
            raise BenchmarkConfigError(msg)
    points = []
    for values in itertools.product(*(init_args[key][GRID_KEY] for key in grid_keys)):
        chosen = dict(zip(grid_keys, values, strict=True))
        suffix = " [" + ", ".join(f"{key}={_format_value(value)}" for key, value in chosen.items()) + "]"
        points.append(({**init_args, **chosen}, suffix if chosen else ""))
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

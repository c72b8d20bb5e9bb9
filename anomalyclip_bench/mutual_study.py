"""What mutual scoring (MuSc) adds to AnomalyCLIP's prompts, on generated categories no prompt was trained on.

The study (run by ``benchmarks/mutual.py``, asserted by ``tests/test_mutual_scoring_model.py``, numbers in
docs/mutual_scoring.md):

1. for each data seed, trains prompts on the auxiliary categories of :mod:`.few_shot_study` generated with that seed
   (dark or bright blobs), as the few-shot study does;
2. generates target categories of three kinds (texture, object on a background, grayscale) with the same seed, in
   two test splits (:data:`SPLITS`): ``varied`` (blobs, scratches, coloured stains and spots, two of each, among 16
   normal images: 33 % anomalous) and ``repeated`` (10 of the 12 anomalous images hold a stain of the category's one
   colour, among 18 normal images: 40 %); with 30 images, each image is compared with its 8 nearest others, fewer
   than the 9 other stains: the same defect again and again, the known weak case of scoring images against each
   other;
3. runs anomalib's ``Engine.test`` on each category (``MVTecAD`` over the generated folder, the user's path) once per
   setting of :data:`SETTINGS` and ``k_shot``: the prompts alone, the mutual score and map alone, and the two fused
   (each with and without RsCIN), and keeps image and pixel AUROC;
4. :func:`pool_size_rows` runs the fused and mutual settings again with ``mutual.pool_size`` below the pool's size
   (the pool is then split into reproducible subsets, each scored on its own).

The CLIP is tiny and random and the data are painted textures: the numbers compare settings on the same images,
they are not accuracy on real products.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anomalib.data import MVTecAD
from anomalib.engine import Engine
from anomalib.metrics import AUROC, Evaluator

from anomalib_anomalyclip.integration.lightning_model import AnomalyCLIP
from anomalib_anomalyclip.method.mutual import MutualScoring, minimum_pool, split_pool
from anomalib_anomalyclip.testing.toy_data import make_mvtec_like_dataset

from .few_shot_study import TARGET_KINDS, Row, StudyConfig, generate_auxiliary, mean_by_setting, train_prompts

__all__ = [
    "SETTINGS",
    "SPLITS",
    "MutualStudyConfig",
    "evaluate_split",
    "generate_targets",
    "markdown_table",
    "pool_size_rows",
    "pool_size_table",
    "prepare_prompts",
]

RSCIN_K = (1, 2, 3)
SETTINGS: dict[str, dict[str, Any] | None] = {
    "prompts": None,
    "mutual": {"fusion": "mutual", "rscin_k": None},
    "mutual_rscin": {"fusion": "mutual", "rscin_k": RSCIN_K},
    "fused": {"fusion": "mean", "rscin_k": None},
    "fused_rscin": {"fusion": "mean", "rscin_k": RSCIN_K},
}
"""The ``mutual`` group of each row of the study (``prompts``: off; zero-shot with ``k_shot = 0``, few-shot with the
bank)."""

SETTING_TITLES = {
    "prompts": "prompts alone (AnomalyCLIP)",
    "mutual": "mutual alone",
    "mutual_rscin": "mutual alone + RsCIN",
    "fused": "fused",
    "fused_rscin": "fused + RsCIN",
}


@dataclass(frozen=True)
class Split:
    """A test split of every target category: its normal images and its anomalous images per defect kind."""

    normal: int
    defects: Mapping[str, int]

    @property
    def size(self) -> int:
        """Images of the split (one pool)."""
        return self.normal + sum(self.defects.values())


SPLITS: dict[str, Split] = {
    "varied": Split(16, dict.fromkeys(("blob", "scratch", "stain", "spots"), 2)),
    "repeated": Split(18, {"stain": 10, "blob": 1, "spots": 1}),
}
"""The study's test splits (see the module's documentation)."""


@dataclass(frozen=True)
class MutualStudyConfig:
    """Sizes of the study.

    Attributes:
        image_size: side of the generated images and of the model input.
        epochs: prompt-training epochs on the auxiliary categories.
        seeds: data seeds (of the auxiliary categories the prompts are trained on, and of the target categories).
        shots: the ``k_shot`` of each setting (0: zero-shot).
        settings: names from :data:`SETTINGS`.
        splits: names from :data:`SPLITS`.
        n_train_good: normal train images per target category (the few-shot references come from them).
        mutual_blocks: visual blocks compared by mutual scoring.
        pool_sizes: ``mutual.pool_size`` values of the pool-size study.
    """

    image_size: int = 112
    epochs: int = 6
    seeds: Sequence[int] = (0, 1, 2)
    shots: Sequence[int] = (0, 4)
    settings: Sequence[str] = tuple(SETTINGS)
    splits: Sequence[str] = tuple(SPLITS)
    n_train_good: int = 6
    mutual_blocks: Sequence[int] = (6, 12, 18, 24)
    pool_sizes: Sequence[int] = (12, 8, 5)
    categories: Mapping[str, str] = field(default_factory=lambda: dict(TARGET_KINDS))


def prepare_prompts(work_dir: Path, clip_path: Path, config: MutualStudyConfig) -> dict[int, Path]:
    """For each seed, prompts trained on the auxiliary categories generated with it, saved as a prompt file."""
    files = {}
    for seed in config.seeds:
        folder = work_dir / f"seed_{seed}"
        auxiliary = generate_auxiliary(folder / "auxiliary", config.image_size, seed=seed)
        study = StudyConfig(image_size=config.image_size, epochs=config.epochs, seed=seed)
        model = train_prompts(auxiliary, clip_path, folder / "prompt_training", study)
        files[seed] = model.model.save_prompts(folder / "prompts.pt")
    return files


def generate_targets(root: Path, split: str, seed: int, config: MutualStudyConfig) -> Path:
    """The target categories of ``split`` generated with ``seed``, under ``root``."""
    return make_mvtec_like_dataset(
        root,
        list(config.categories),
        image_size=config.image_size,
        n_train_good=config.n_train_good,
        n_test_good=SPLITS[split].normal,
        n_test_defect=SPLITS[split].defects,
        defects=tuple(SPLITS[split].defects),
        seed=seed,
        overwrite=True,
        kinds=dict(config.categories),
    )


def evaluate_split(
    work_dir: Path, clip_path: Path, prompts: Mapping[int, Path], split: str, config: MutualStudyConfig
) -> list[Row]:
    """One row per seed, category, ``k_shot`` and setting of ``split`` (``prompts``: the prompt file of each seed)."""
    models = StudyModels(clip_path, work_dir, config)
    rows = []
    for seed in config.seeds:
        root = generate_targets(work_dir / f"seed_{seed}" / split, split, seed, config)
        for category, kind in config.categories.items():
            for k_shot in config.shots:
                for setting in config.settings:
                    arguments = {"mutual": SETTINGS[setting], "k_shot": k_shot}
                    image, pixel = models.test(root, category, prompts[seed], arguments)
                    rows.append(Row(category, kind, k_shot, setting, image, pixel, seed=seed, split=split))
    return rows


def pool_size_rows(
    work_dir: Path, clip_path: Path, prompts: Mapping[int, Path], config: MutualStudyConfig
) -> list[Row]:
    """Zero-shot ``fused`` and ``mutual`` rows of the varied split at each of ``config.pool_sizes``.

    The setting of a row is ``<setting>@<pool size>``; the whole pool's rows are those of :func:`evaluate_split`.
    """
    models = StudyModels(clip_path, work_dir, config)
    rows = []
    for seed in config.seeds:
        root = generate_targets(work_dir / f"seed_{seed}" / "varied", "varied", seed, config)
        for category, kind in config.categories.items():
            for setting in ("mutual", "fused"):
                for size in config.pool_sizes:
                    arguments = {"mutual": {**SETTINGS[setting], "pool_size": size}}
                    image, pixel = models.test(root, category, prompts[seed], arguments)
                    rows.append(Row(category, kind, 0, f"{setting}@{size}", image, pixel, seed=seed, split="varied"))
    return rows


class StudyModels:
    """The study's AnomalyCLIP models, one per prompt file and set of arguments, reused from category to category.

    As in the benchmark harness: the CLIP and the prompts do not depend on the category, so a model is built (and its
    text features computed) once; each ``Engine.test`` then validates and tests it on one category.

    Args:
        clip_path: the CLIP checkpoint.
        work_dir: where anomalib's runs go (``runs/``).
        config: the study's sizes (image size, mutual blocks).
    """

    def __init__(self, clip_path: Path, work_dir: Path, config: MutualStudyConfig) -> None:
        self.clip_path, self.work_dir, self.config = clip_path, work_dir, config
        self._models: dict[tuple, AnomalyCLIP] = {}

    def test(self, root: Path, category: str, prompts: Path, arguments: Mapping[str, Any]) -> tuple[float, float]:
        """Image and pixel AUROC of ``Engine.test`` of the model with ``arguments`` on ``category`` under ``root``."""
        model = self.model(prompts, arguments)
        datamodule = MVTecAD(root=root, category=category, eval_batch_size=32, num_workers=0)
        engine = Engine(
            default_root_dir=self.work_dir / "runs", accelerator="cpu", devices=1, logger=False,
            enable_progress_bar=False,
        )  # fmt: skip
        (metrics,) = engine.test(model, datamodule=datamodule, verbose=False)
        return float(metrics["image_AUROC"]), float(metrics["pixel_AUROC"])

    def model(self, prompts: Path, arguments: Mapping[str, Any]) -> AnomalyCLIP:
        """The model with ``prompts`` and ``arguments`` (built on first use)."""
        key = (str(prompts), repr(sorted(arguments.items())))
        if key not in self._models:
            mutual = arguments.get("mutual")
            blocks = tuple(self.config.mutual_blocks)
            self._models[key] = AnomalyCLIP(
                pretrained=str(self.clip_path),
                image_size=self.config.image_size,
                prompt_weights=str(prompts),
                k_shot=arguments.get("k_shot", 0),
                mutual={"enabled": mutual is not None, **(mutual or {}), "blocks": blocks},
                evaluator=_auroc_evaluator(),
                visualizer=False,
            )
        return self._models[key]


def _auroc_evaluator() -> Evaluator:
    """Image and pixel AUROC only (the study's metrics; the others cost time)."""
    return Evaluator(
        test_metrics=[
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        ]
    )


def markdown_table(rows: Sequence[Row], settings: Sequence[str] = tuple(SETTINGS)) -> str:
    """Mean image / pixel AUROC (percent) per setting (rows) and ``k_shot`` (columns), with the seeds' range."""
    means = mean_by_setting(rows)
    shots = sorted({row.k_shot for row in rows})
    lines = ["| setting | " + " | ".join(f"k = {k}: image / pixel AUROC" for k in shots) + " |"]
    lines.append("|---|" + "---|" * len(shots))
    for setting in settings:
        cells = [_cell(means, rows, k, setting) for k in shots]
        lines.append(f"| {SETTING_TITLES.get(setting, setting)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pool_size_table(rows: Sequence[Row], whole: Sequence[Row], pool: int) -> str:
    """Mean image / pixel AUROC (percent) of the mutual and fused settings per ``mutual.pool_size``."""
    sizes = sorted({int(row.fusion.split("@")[1]) for row in rows}, reverse=True)
    renamed = [_renamed(row, f"{row.fusion}@{pool}") for row in whole if row.k_shot == 0]
    means = mean_by_setting([*rows, *renamed])
    lines = [f"| mutual.pool_size | subsets of a pool of {pool} | mutual alone | fused |", "|---|---|---|---|"]
    for size in [pool, *sizes]:
        subsets = "whole pool" if size >= pool else f"{_subset_count(pool, size)} subsets"
        cells = [_percent(means[(0, f"{setting}@{size}")]) for setting in ("mutual", "fused")]
        lines.append(f"| {size} | {subsets} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_seed_means(rows: Sequence[Row]) -> Iterator[tuple[int, dict[tuple[int, str], tuple[float, float]]]]:
    """``(seed, mean_by_setting of its rows)`` for each seed of ``rows``."""
    for seed in sorted({row.seed for row in rows}):
        yield seed, mean_by_setting([row for row in rows if row.seed == seed])


def _cell(means: Mapping[tuple[int, str], tuple[float, float]], rows: Sequence[Row], k: int, setting: str) -> str:
    if (k, setting) not in means:
        return "-"
    seeds = [seed_means[(k, setting)] for _, seed_means in per_seed_means(rows) if (k, setting) in seed_means]
    low, high = min(image for image, _ in seeds), max(image for image, _ in seeds)
    return f"{_percent(means[(k, setting)])} (image {100 * low:.1f}-{100 * high:.1f})"


def _percent(pair: tuple[float, float]) -> str:
    return f"{100 * pair[0]:.1f} / {100 * pair[1]:.1f}"


def _renamed(row: Row, fusion: str) -> Row:
    return Row(row.category, row.kind, row.k_shot, fusion, row.image_auroc, row.pixel_auroc, row.seed, row.split)


def _subset_count(pool: int, size: int) -> int:
    return len(split_pool(pool, size, 0, minimum_pool(MutualScoring.fraction)))

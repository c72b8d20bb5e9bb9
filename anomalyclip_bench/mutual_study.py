"""What mutual scoring (MuSc) adds to AnomalyCLIP's prompts, on generated categories no prompt was trained on.

The study (run by ``benchmarks/mutual.py``, asserted by ``tests/test_mutual_scoring_model.py``, numbers in the README):

1. trains prompts on the auxiliary categories of :mod:`.few_shot_study` (dark or bright blobs), once;
2. for each data seed, generates target categories of three kinds (texture, object on a background, grayscale) in two
   test splits: ``varied`` (blobs, scratches, coloured stains and spots, the same number of each, 20-40 % of the
   images anomalous) and ``repeated`` (most anomalous images hold a stain of the category's one colour: the same
   defect again and again, the known weak case of scoring images against each other);
3. runs anomalib's ``Engine.test`` on each category (``MVTecAD`` over the generated folder, the user's path) once per
   setting of :data:`SETTINGS` and ``k_shot``: the prompts alone, the mutual score and map alone, and the two fused
   (each with and without RsCIN), and keeps image and pixel AUROC;
4. :func:`pool_size_rows` runs the fused and mutual settings again with ``mutual_pool_size`` below the pool's size
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

from anomalib_anomalyclip.lightning_model import AnomalyCLIP
from anomalib_anomalyclip.mutual import MutualScoringConfig, minimum_pool, split_pool
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
SETTINGS: dict[str, dict[str, Any]] = {
    "prompts": {"mutual_scoring": False},
    "mutual": {"mutual_scoring": True, "mutual_fusion": "mutual", "rscin_k": None},
    "mutual_rscin": {"mutual_scoring": True, "mutual_fusion": "mutual", "rscin_k": RSCIN_K},
    "fused": {"mutual_scoring": True, "mutual_fusion": "mean", "rscin_k": None},
    "fused_rscin": {"mutual_scoring": True, "mutual_fusion": "mean", "rscin_k": RSCIN_K},
}
"""Model arguments of each row of the study (``prompts``: zero-shot with ``k_shot = 0``, few-shot with the bank)."""

SETTING_TITLES = {
    "prompts": "prompts alone (AnomalyCLIP)",
    "mutual": "mutual alone",
    "mutual_rscin": "mutual alone + RsCIN",
    "fused": "fused",
    "fused_rscin": "fused + RsCIN",
}
VARIED_DEFECTS = ("blob", "scratch", "stain", "spots")
SPLITS: dict[str, dict[str, int]] = {
    "varied": dict.fromkeys(VARIED_DEFECTS, 2),
    "repeated": {"stain": 7, "blob": 1, "spots": 1},
}
"""Anomalous test images per defect kind of each split (with ``n_test_good`` normal ones: 33 % and 36 %)."""


@dataclass(frozen=True)
class MutualStudyConfig:
    """Sizes of the study.

    Attributes:
        image_size: side of the generated images and of the model input.
        epochs: prompt-training epochs on the auxiliary categories.
        seeds: data seeds of the target categories (the prompts are trained once, on seed 0's auxiliary data).
        shots: the ``k_shot`` of each setting (0: zero-shot).
        settings: names from :data:`SETTINGS`.
        splits: names from :data:`SPLITS`.
        n_train_good: normal train images per target category (the few-shot references come from them).
        n_test_good: normal test images per target category.
        mutual_blocks: visual blocks compared by mutual scoring.
        pool_sizes: ``mutual_pool_size`` values of the pool-size study.
    """

    image_size: int = 112
    epochs: int = 6
    seeds: Sequence[int] = (0, 1, 2)
    shots: Sequence[int] = (0, 4)
    settings: Sequence[str] = tuple(SETTINGS)
    splits: Sequence[str] = tuple(SPLITS)
    n_train_good: int = 6
    n_test_good: int = 16
    mutual_blocks: Sequence[int] = (6, 12, 18, 24)
    pool_sizes: Sequence[int] = (12, 8, 5)
    categories: Mapping[str, str] = field(default_factory=lambda: dict(TARGET_KINDS))


def prepare_prompts(work_dir: Path, clip_path: Path, config: MutualStudyConfig) -> Path:
    """Prompts trained on the auxiliary categories (seed 0), saved as a prompt file."""
    auxiliary = generate_auxiliary(work_dir / "auxiliary", config.image_size, seed=0)
    study = StudyConfig(image_size=config.image_size, epochs=config.epochs, seed=0)
    model = train_prompts(auxiliary, clip_path, work_dir / "prompt_training", study)
    return model.model.save_prompts(work_dir / "prompts.pt")


def generate_targets(root: Path, split: str, seed: int, config: MutualStudyConfig) -> Path:
    """The target categories of ``split`` generated with ``seed``, under ``root``."""
    return make_mvtec_like_dataset(
        root,
        list(config.categories),
        image_size=config.image_size,
        n_train_good=config.n_train_good,
        n_test_good=config.n_test_good,
        n_test_defect=SPLITS[split],
        defects=tuple(SPLITS[split]),
        seed=seed,
        overwrite=True,
        kinds=dict(config.categories),
    )


def evaluate_split(work_dir: Path, clip_path: Path, prompts: Path, split: str, config: MutualStudyConfig) -> list[Row]:
    """One row per seed, category, ``k_shot`` and setting of ``split``."""
    rows = []
    for seed in config.seeds:
        root = generate_targets(work_dir / "targets" / f"{split}_{seed}", split, seed, config)
        for category, kind in config.categories.items():
            for k_shot in config.shots:
                for setting in config.settings:
                    arguments = {**SETTINGS[setting], "k_shot": k_shot}
                    image, pixel = score_category(root, category, clip_path, prompts, work_dir, config, arguments)
                    rows.append(Row(category, kind, k_shot, setting, image, pixel, seed=seed, split=split))
    return rows


def pool_size_rows(work_dir: Path, clip_path: Path, prompts: Path, config: MutualStudyConfig) -> list[Row]:
    """Zero-shot ``fused`` and ``mutual`` rows of the varied split at each of ``config.pool_sizes``.

    The setting of a row is ``<setting>@<pool size>``; the whole pool's rows are those of :func:`evaluate_split`.
    """
    rows = []
    for seed in config.seeds:
        root = generate_targets(work_dir / "targets" / f"varied_{seed}", "varied", seed, config)
        for category, kind in config.categories.items():
            for setting in ("mutual", "fused"):
                for size in config.pool_sizes:
                    arguments = {**SETTINGS[setting], "mutual_pool_size": size}
                    image, pixel = score_category(root, category, clip_path, prompts, work_dir, config, arguments)
                    rows.append(Row(category, kind, 0, f"{setting}@{size}", image, pixel, seed=seed, split="varied"))
    return rows


def score_category(
    root: Path,
    category: str,
    clip_path: Path,
    prompts: Path,
    work_dir: Path,
    config: MutualStudyConfig,
    arguments: Mapping[str, Any],
) -> tuple[float, float]:
    """Image and pixel AUROC of ``anomalib``'s ``Engine.test`` of AnomalyCLIP with ``arguments`` on ``category``."""
    model = AnomalyCLIP(
        pretrained=str(clip_path),
        image_size=config.image_size,
        prompt_weights=str(prompts),
        mutual_blocks=tuple(config.mutual_blocks),
        evaluator=_auroc_evaluator(),
        visualizer=False,
        **arguments,
    )
    datamodule = MVTecAD(root=root, category=category, eval_batch_size=32, num_workers=0)
    engine = Engine(
        default_root_dir=work_dir / "runs", accelerator="cpu", devices=1, logger=False, enable_progress_bar=False
    )
    (metrics,) = engine.test(model, datamodule=datamodule, verbose=False)
    return float(metrics["image_AUROC"]), float(metrics["pixel_AUROC"])


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
    """Mean image / pixel AUROC (percent) of the mutual and fused settings per ``mutual_pool_size``."""
    sizes = sorted({int(row.fusion.split("@")[1]) for row in rows}, reverse=True)
    renamed = [_renamed(row, f"{row.fusion}@{pool}") for row in whole if row.k_shot == 0]
    means = mean_by_setting([*rows, *renamed])
    lines = [f"| mutual_pool_size | subsets of a pool of {pool} | mutual alone | fused |", "|---|---|---|---|"]
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
    return len(split_pool(pool, size, 0, minimum_pool(MutualScoringConfig.fraction)))

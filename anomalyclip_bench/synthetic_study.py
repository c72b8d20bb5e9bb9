"""Do prompts adapted with synthetic anomalies on a category's normal images score its real defects better?

The study (asserted by the tests, numbers in docs/adaptation.md):

1. generates the target categories of :mod:`.few_shot_study` (texture, object, grayscale: painted blobs and
   scratches as defects) and its auxiliary categories;
2. for each target category, fine-tunes the *start prompts* on the category's normal train images plus anomalies
   synthesised from them by anomalib's Perlin generator (an :class:`~anomalib_anomalyclip.data.AuxiliaryDataModule`
   with one ``synthetic`` source, through anomalib's Engine), never showing it a real defect;
3. scores each category's test split (real generated defects) with the start prompts, the adapted prompts and the
   prompts trained on the auxiliary categories' labelled defects: image and pixel AUROC, zero-shot and with
   ``k`` normal references.

The data are random textures and the CLIP is tiny and random: the numbers compare prompts, they are not accuracy.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from anomalib_anomalyclip.integration.lightning_model import AnomalyCLIP
from anomalib_anomalyclip.testing.toy_data import category_style, make_mvtec_like_dataset

from .few_shot_study import (
    DEFECTS,
    TARGET_KINDS,
    Row,
    StudyConfig,
    evaluate,
    evaluate_category,
    fit_prompts,
    generate,
    mean_by_setting,
    train_prompts,
)

__all__ = [
    "SeedRow",
    "Setting",
    "SyntheticConfig",
    "adapt_prompts",
    "markdown_table",
    "multi_seed_study",
    "multi_seed_table",
    "run_study",
    "seed_categories",
]


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes of the study.

    Attributes:
        data: image size, train/test counts, auxiliary epochs and ``k`` of the underlying few-shot study.
        epochs: fine-tuning epochs on the synthetic anomalies.
        lr: fine-tuning learning rate.
        anomalous_fraction: share of synthetic anomalies in the training set.
        loss: the model's ``loss`` (``glocal``, ``global`` or ``local``).
    """

    data: StudyConfig = field(default_factory=lambda: StudyConfig(shots=()))
    epochs: int = 10
    lr: float = 1e-3
    anomalous_fraction: float = 0.5
    loss: str = "glocal"


def adapt_prompts(start: Path, folder: Path, clip_path: Path, work_dir: Path, config: SyntheticConfig) -> AnomalyCLIP:
    """The start prompts fine-tuned on ``folder``'s normal train images with synthetic anomalies."""
    data = config.data
    model = AnomalyCLIP(
        pretrained=str(clip_path),
        image_size=data.image_size,
        prompt_weights=str(start),
        train_prompts=True,
        epochs=config.epochs,
        lr=config.lr,
        loss=config.loss,
        visualizer=False,
    )
    source = {
        "format": "synthetic",
        "root": str(folder),
        "seed": data.seed,
        "anomalous_fraction": config.anomalous_fraction,
        "output_dir": str(work_dir / "synthetic"),
    }
    return fit_prompts(model, [source], work_dir, config.epochs, data.seed)


def _start_model(start: Path, clip_path: Path, config: SyntheticConfig) -> AnomalyCLIP:
    return AnomalyCLIP(
        pretrained=str(clip_path), image_size=config.data.image_size, prompt_weights=str(start), visualizer=False
    )


def run_study(root: Path, clip_path: Path, start: Path, config: SyntheticConfig, other: bool = True) -> dict:
    """Rows per prompt set: ``start``, ``adapted`` and, with ``other``, ``other categories``.

    Args:
        root: working folder (data, runs).
        clip_path: the CLIP weights.
        start: the start prompts (a prompt file).
        config: the study's sizes.
        other: also train and score prompts on the auxiliary categories' labelled defects.

    Returns:
        Prompt set name -> rows of :func:`.few_shot_study.evaluate`.
    """
    auxiliary, targets = generate(root / "data", config.data)
    results = {"start": evaluate(_start_model(start, clip_path, config), targets, config.data)}
    adapted: list[Row] = []
    for category, kind in TARGET_KINDS.items():
        folder = targets / category
        model = adapt_prompts(start, folder, clip_path, root / "runs" / category, config)
        adapted.extend(evaluate_category(model, folder, category, kind, config.data))
    results["adapted"] = adapted
    if other:
        trained = train_prompts(auxiliary, clip_path, root / "runs" / "auxiliary", config.data)
        results["other categories"] = evaluate(trained, targets, config.data)
    return results


def markdown_table(results: dict, shots: Sequence[int] = (0,)) -> str:
    """Image / pixel AUROC (percent) per prompt set (rows) and category, with the mean, for each ``k``."""
    lines = []
    for k_shot in shots:
        fusion = "zero_shot" if k_shot == 0 else "mean"
        header = ["prompts", "k", *TARGET_KINDS, "mean"]
        lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        for name, rows in results.items():
            chosen = {row.category: row for row in rows if row.k_shot == k_shot and row.fusion == fusion}
            cells = [f"{100 * chosen[c].image_auroc:.1f} / {100 * chosen[c].pixel_auroc:.1f}" for c in TARGET_KINDS]
            image, pixel = mean_by_setting(list(chosen.values()))[(k_shot, fusion)]
            lines.append(f"| {name} | {k_shot} | " + " | ".join(cells) + f" | {100 * image:.1f} / {100 * pixel:.1f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# The multi-seed study: several data seeds, start prompts and fine-tuning settings
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One fine-tuning setting compared by :func:`multi_seed_study`: the loss and the synthetic fraction."""

    loss: str = "glocal"
    anomalous_fraction: float = 0.5

    @property
    def name(self) -> str:
        """``loss <loss>, fraction <f>``."""
        return f"{self.loss}, fraction {self.anomalous_fraction:g}"


@dataclass(frozen=True)
class SeedRow:
    """One category of one run: its zero-shot (image, pixel) AUROC with the start and the adapted prompts."""

    setting: str
    data_seed: int
    prompt_seed: int
    category: str
    kind: str
    start: tuple[float, float]
    adapted: tuple[float, float]


def seed_categories(seed: int) -> dict[str, str]:
    """The multi-seed study's categories for data ``seed``: a texture, a grayscale one, an object on a dark background.

    Their names differ from the few-shot study's (other looks); the object's name is the first ``seeds_object_<i>``
    whose background is dark for ``seed`` (the toy data draw the background from the name and the seed).
    """
    for index in range(1000):
        name = f"seeds_object_{index}"
        if max(category_style(name, seed, "object").background) < 0.5:
            return {"seeds_texture": "texture", "seeds_gray": "grayscale", name: "object"}
    raise RuntimeError(f"no dark-background object category found for seed {seed}")  # pragma: no cover


def _row_key(setting: str, data_seed: int, prompt_seed: int, category: str) -> tuple:
    return setting, data_seed, prompt_seed, category


def _zero_shot(model: AnomalyCLIP, folder: Path, category: str, kind: str, data: StudyConfig) -> tuple[float, float]:
    (row,) = evaluate_category(model, folder, category, kind, data)
    return row.image_auroc, row.pixel_auroc


def multi_seed_study(
    root: Path,
    clip_path: Path,
    start_prompts: Mapping[int, Path],
    settings: Sequence[Setting],
    data_seeds: Sequence[int],
    config: SyntheticConfig,
    done: Iterable[SeedRow] = (),
    report: Callable[[SeedRow], None] = lambda row: None,
) -> list[SeedRow]:
    """Start and adapted zero-shot AUROC of every (data seed, start prompts, setting, category).

    Args:
        root: working folder (data, runs).
        clip_path: the CLIP weights.
        start_prompts: prompt seed -> start prompt file (fine-tuned from there, scored as the start).
        settings: the fine-tuning settings compared (epochs and learning rate from ``config``).
        data_seeds: seeds of the generated categories (:func:`seed_categories`).
        config: sizes, epochs, learning rate (its ``loss`` and ``anomalous_fraction`` are replaced per setting).
        done: rows of an earlier, interrupted run, reused instead of recomputed.
        report: called with every new row (e.g. to append it to a file).

    Returns:
        One row per (setting, data seed, prompt seed, category), ``done`` ones included.
    """
    rows = {_row_key(r.setting, r.data_seed, r.prompt_seed, r.category): r for r in done}
    for data_seed in data_seeds:
        data = replace(config.data, seed=data_seed, shots=())
        kinds = seed_categories(data_seed)
        targets = make_mvtec_like_dataset(
            root / f"data_{data_seed}", list(kinds), image_size=data.image_size, n_train_good=data.n_train_good,
            n_test_good=data.n_test, n_test_defect=data.n_test, defects=DEFECTS, seed=data_seed, overwrite=True,
            kinds=kinds,
        )  # fmt: skip
        for prompt_seed, start in start_prompts.items():
            begin = _start_model(start, clip_path, config)
            scores: dict[str, tuple[float, float]] = {}
            for setting in settings:
                tuned = replace(config, data=data, loss=setting.loss, anomalous_fraction=setting.anomalous_fraction)
                for category, kind in kinds.items():
                    key = _row_key(setting.name, data_seed, prompt_seed, category)
                    if key in rows:
                        continue
                    folder = targets / category
                    work = root / "runs" / f"{setting.loss}_{setting.anomalous_fraction:g}_{data_seed}_{prompt_seed}"
                    model = adapt_prompts(start, folder, clip_path, work / category, tuned)
                    if category not in scores:
                        scores[category] = _zero_shot(begin, folder, category, kind, data)
                    adapted = _zero_shot(model, folder, category, kind, data)
                    row = SeedRow(setting.name, data_seed, prompt_seed, category, kind, scores[category], adapted)
                    rows[key] = row
                    report(row)
    return list(rows.values())


def read_rows(path: Path) -> list[SeedRow]:
    """The rows of a JSON-lines file written by :func:`write_row` (none when it does not exist)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        fields = json.loads(line)
        rows.append(SeedRow(**{**fields, "start": tuple(fields["start"]), "adapted": tuple(fields["adapted"])}))
    return rows


def write_row(path: Path, row: SeedRow) -> None:
    """Append ``row`` to a JSON-lines file."""
    with path.open("a") as stream:
        stream.write(json.dumps(asdict(row)) + "\n")


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values)


def multi_seed_table(rows: Sequence[SeedRow]) -> str:
    """Per setting: mean start and adapted image / pixel AUROC (%), the change, the worst category and run.

    Means are over every data seed, start prompt and category. *Worst kind* is the category kind whose mean image
    change (over the seeds) is lowest; *worst run* is the lowest single image change; *losing runs* counts the (data
    seed, start prompt) pairs in which at least one category lost image AUROC.
    """
    header = ["setting", "runs", "start", "adapted", "change", "worst kind (mean change)", "worst run", "losing runs"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for setting in dict.fromkeys(row.setting for row in rows):
        group = [row for row in rows if row.setting == setting]
        start = [_mean(row.start[i] for row in group) for i in (0, 1)]
        adapted = [_mean(row.adapted[i] for row in group) for i in (0, 1)]
        change = {kind: [_mean(r.adapted[i] - r.start[i] for r in group if r.kind == kind) for i in (0, 1)]
                  for kind in dict.fromkeys(row.kind for row in group)}  # fmt: skip
        worst = min(change, key=lambda kind: change[kind][0])
        runs = {(row.data_seed, row.prompt_seed) for row in group}
        losing = {(r.data_seed, r.prompt_seed) for r in group if r.adapted[0] < r.start[0]}
        cells = [
            setting,
            str(len(runs)),
            f"{100 * start[0]:.1f} / {100 * start[1]:.1f}",
            f"{100 * adapted[0]:.1f} / {100 * adapted[1]:.1f}",
            f"{100 * (adapted[0] - start[0]):+.1f} / {100 * (adapted[1] - start[1]):+.1f}",
            f"{worst} {100 * change[worst][0]:+.1f} / {100 * change[worst][1]:+.1f}",
            f"{100 * min(r.adapted[0] - r.start[0] for r in group):+.1f}",
            f"{len(losing)} / {len(runs)}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

"""Do prompts adapted with synthetic anomalies on a category's normal images score its real defects better?

The study (asserted by the tests, numbers in the README):

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

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from anomalib_anomalyclip.lightning_model import AnomalyCLIP

from .few_shot_study import (
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

__all__ = ["SyntheticConfig", "adapt_prompts", "markdown_table", "run_study"]


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes of the study.

    Attributes:
        data: image size, train/test counts, auxiliary epochs and ``k`` of the underlying few-shot study.
        epochs: fine-tuning epochs on the synthetic anomalies.
        lr: fine-tuning learning rate.
        anomalous_fraction: share of synthetic anomalies in the training set.
    """

    data: StudyConfig = field(default_factory=lambda: StudyConfig(shots=()))
    epochs: int = 10
    lr: float = 1e-3
    anomalous_fraction: float = 0.5


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

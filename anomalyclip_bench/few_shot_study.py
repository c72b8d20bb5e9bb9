"""How much k normal references add to zero-shot AnomalyCLIP, on generated categories no prompt was trained on.

The study (run by ``benchmarks/few_shot.py`` and asserted by the tests):

1. generates MVTec-format categories (dark or bright blobs and scratches as defects):
   *auxiliary* ones whose labelled test splits train the prompts (anomalib's Engine with
   :class:`~anomalib_anomalyclip.data.AuxiliaryDataModule`), and *target* ones of each kind
   (texture, object on a background, grayscale) that the prompts never see;
2. encodes every target image once (the global embedding, the feature taps and the bank's
   taps), so that all ``k`` and fusions reuse the same features;
3. for each ``k``, fills the bank with ``k`` train images chosen as the model chooses them
   (:func:`~anomalib_anomalyclip.method.few_shot.choose_references`) and scores the test split
   zero-shot (``k = 0``) and with each fusion: image AUROC and pixel AUROC.

:func:`false_alarm_rate` measures the other half of the few-shot story: thresholds set
from normal images only (``normal_quantile``), checked on other normal images.

The data are random textures and shapes with painted defects and the CLIP is tiny and
random: the numbers show what the bank adds over the same prompts, not real accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from anomalib.data import MVTecAD
from anomalib.data.utils import ValSplitMode
from anomalib.engine import Engine
from torchmetrics.functional.classification import binary_auroc

from anomalib_anomalyclip.data.auxiliary import AuxiliaryDataModule
from anomalib_anomalyclip.data.images import list_image_files, read_image, read_mask
from anomalib_anomalyclip.integration.lightning_model import AnomalyCLIP
from anomalib_anomalyclip.method.dpam import Tap, VisualFeatures
from anomalib_anomalyclip.method.few_shot import FewShotFusion, choose_references
from anomalib_anomalyclip.testing.toy_data import make_mvtec_like_dataset

AUXILIARY_KINDS = {
    "aux_texture_a": "texture",
    "aux_texture_b": "texture",
    "aux_object": "object",
    "aux_gray": "grayscale",
}
TARGET_KINDS = {"target_texture": "texture", "target_object": "object", "target_gray": "grayscale"}
DEFECTS = ("blob", "scratch")


@dataclass(frozen=True)
class StudyConfig:
    """Sizes of the study.

    Attributes:
        image_size: side of the generated images and of the model input.
        shots: the ``k`` to evaluate (0, zero-shot, is always included).
        epochs: prompt-training epochs on the auxiliary categories.
        n_train_good: normal train images per target category (the reference pool).
        n_test: normal and defective test images per category (each).
        seed: data and reference-choice seed.
    """

    image_size: int = 112
    shots: Sequence[int] = (1, 2, 4, 8)
    epochs: int = 6
    n_train_good: int = 8
    n_test: int = 8
    seed: int = 0


@dataclass(frozen=True)
class Row:
    """One line of a study: a category, k, a fusion (or setting), the two AUROCs, and the data's seed and split."""

    category: str
    kind: str
    k_shot: int
    fusion: str
    image_auroc: float
    pixel_auroc: float
    seed: int = 0
    split: str = ""


def generate_auxiliary(root: Path, image_size: int, seed: int) -> Path:
    """The auxiliary categories (labelled test splits with blobs, for prompt training) under ``root``."""
    return make_mvtec_like_dataset(
        root,
        list(AUXILIARY_KINDS),
        image_size=image_size,
        n_train_good=2,
        n_test_good=6,
        n_test_defect=6,
        seed=seed,
        overwrite=True,
        kinds=AUXILIARY_KINDS,
    )


def generate(root: Path, config: StudyConfig) -> tuple[Path, Path]:
    """The auxiliary and target datasets under ``root``."""
    common = {"image_size": config.image_size, "seed": config.seed, "overwrite": True}
    auxiliary = generate_auxiliary(root / "auxiliary", config.image_size, config.seed)
    targets = make_mvtec_like_dataset(
        root / "targets",
        list(TARGET_KINDS),
        n_train_good=config.n_train_good,
        n_test_good=config.n_test,
        n_test_defect=config.n_test,
        kinds=TARGET_KINDS,
        defects=DEFECTS,
        **common,
    )
    return auxiliary, targets


def train_prompts(auxiliary: Path, clip_path: Path, work_dir: Path, config: StudyConfig) -> AnomalyCLIP:
    """Prompts learned on the auxiliary categories (the paper's protocol, in small).

    ``epochs=0`` returns the seeded, untrained prompts instead: weak zero-shot maps.
    """
    model = AnomalyCLIP(pretrained=str(clip_path), image_size=config.image_size, epochs=config.epochs, visualizer=False)
    if config.epochs == 0:
        return model
    sources = [{"format": "mvtec", "root": str(auxiliary)}]
    return fit_prompts(model, sources, work_dir, config.epochs, config.seed)


def fit_prompts(model: AnomalyCLIP, sources: list[dict], work_dir: Path, epochs: int, seed: int) -> AnomalyCLIP:
    """Learn ``model``'s prompts on an auxiliary datamodule over ``sources`` with anomalib's Engine (no validation)."""
    datamodule = AuxiliaryDataModule(sources=sources, train_batch_size=8, num_workers=0, seed=seed)
    engine = Engine(
        default_root_dir=work_dir,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        max_epochs=epochs,
    )
    engine.fit(model, datamodule=datamodule)
    return model


def evaluate(model: AnomalyCLIP, targets: Path, config: StudyConfig) -> list[Row]:
    """Zero-shot and few-shot rows for every target category, k and fusion."""
    rows = []
    for category, kind in TARGET_KINDS.items():
        rows.extend(evaluate_category(model, targets / category, category, kind, config))
    return rows


def evaluate_category(model: AnomalyCLIP, folder: Path, category: str, kind: str, config: StudyConfig) -> list[Row]:
    """Zero-shot and few-shot rows (each k and fusion) of one generated category's test split."""
    torch_model = model.model.eval()
    taps = torch_model.feature_taps  # the bank reads the feature layers' tokens
    size = (config.image_size, config.image_size)
    test_paths = list_image_files(folder / "test")
    labels = torch.tensor([0 if path.parent.name == "good" else 1 for path in test_paths])
    masks = torch.stack([_mask(folder, path, config.image_size) for path in test_paths])
    test = _encode(model, test_paths, taps)
    pool = [str(path) for path in list_image_files(folder / "train" / "good")]
    rows = [
        _row(
            category,
            kind,
            0,
            "zero_shot",
            torch_model.scores_from_features(test.global_embedding, test.patch_tokens, size),
            labels,
            masks,
        )
    ]
    for k_shot in config.shots:
        references = choose_references(pool, k_shot, config.seed, f"{category}/train/good")
        bank = _encode(model, [Path(path) for path in references], taps).extra_tokens
        for fusion in FewShotFusion:
            scorer = torch_model.new_few_shot_scorer(taps, fusion)
            scorer.remember(bank)
            outputs = torch_model.scores_from_features(
                test.global_embedding, test.patch_tokens, size, scorer, test.extra_tokens
            )
            rows.append(_row(category, kind, k_shot, fusion.value, outputs, labels, masks))
    return rows


def _encode(model: AnomalyCLIP, paths: Sequence[Path], bank_taps: Sequence[Tap]) -> VisualFeatures:
    images = torch.cat([model.pre_processor.transform(read_image(path).unsqueeze(0)) for path in paths])
    return model.model.encode(images, bank_taps)


def _mask(folder: Path, image: Path, size: int) -> torch.Tensor:
    if image.parent.name == "good":
        return torch.zeros(size, size, dtype=torch.long)
    mask_path = folder / "ground_truth" / image.parent.name / f"{image.stem}_mask.png"
    mask = read_mask(mask_path).float()[None, None]
    return (F.interpolate(mask, size=(size, size), mode="nearest")[0, 0] > 0.5).long()


def _row(category: str, kind: str, k_shot: int, fusion: str, outputs, labels: torch.Tensor, masks: torch.Tensor) -> Row:
    image = float(binary_auroc(outputs.pred_score, labels))
    pixel = float(binary_auroc(outputs.anomaly_map[:, 0].flatten(), masks.flatten()))
    return Row(category, kind, k_shot, fusion, image, pixel)


def mean_by_setting(rows: Sequence[Row]) -> dict[tuple[int, str], tuple[float, float]]:
    """Mean (image, pixel) AUROC over the categories, per (k, fusion)."""
    settings: dict[tuple[int, str], list[Row]] = {}
    for row in rows:
        settings.setdefault((row.k_shot, row.fusion), []).append(row)
    return {
        key: (
            sum(row.image_auroc for row in group) / len(group),
            sum(row.pixel_auroc for row in group) / len(group),
        )
        for key, group in settings.items()
    }


def markdown_table(rows: Sequence[Row]) -> str:
    """Mean image / pixel AUROC per k (rows) and fusion (columns), in percent."""
    means = mean_by_setting(rows)
    shots = sorted({k for k, _ in means})
    fusions = [fusion.value for fusion in FewShotFusion]
    lines = ["| k | " + " | ".join(f"{fusion} (image / pixel)" for fusion in fusions) + " |"]
    lines.append("|---|" + "---|" * len(fusions))
    for k_shot in shots:
        if k_shot == 0:
            image, pixel = means[(0, "zero_shot")]
            cells = [f"{100 * image:.1f} / {100 * pixel:.1f} (zero-shot)"] * len(fusions)
        else:
            cells = [f"{100 * means[(k_shot, f)][0]:.1f} / {100 * means[(k_shot, f)][1]:.1f}" for f in fusions]
        lines.append(f"| {k_shot} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def false_alarm_rate(model: AnomalyCLIP, root: Path, category: str, work_dir: Path, seed: int = 0) -> float:
    """Share of the test split's normal images that ``model`` calls anomalous.

    The validation split is half of the train split's normal images (anomalib's
    ``from_train``), so the model's thresholds come from normal images only; with
    ``k_shot`` the references are taken from the other half.
    """
    datamodule = MVTecAD(
        root=root,
        category=category,
        val_split_mode=ValSplitMode.FROM_TRAIN,
        val_split_ratio=0.5,
        num_workers=0,
        seed=seed,
    )
    engine = Engine(default_root_dir=work_dir, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    predictions = engine.predict(model, datamodule=datamodule)
    labels = torch.cat([batch.gt_label for batch in predictions]).bool()
    decisions = torch.cat([batch.pred_label for batch in predictions]).bool().flatten()
    return float(decisions[~labels].float().mean())

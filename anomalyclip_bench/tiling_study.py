"""Does tiling find small defects on large images that the single input-size view misses?

The study (run by ``benchmarks/tiling.py`` and asserted by the tests):

1. generates, per data seed, categories of each kind (texture, object on a background, grayscale) of large images
   (1536 px) whose defective images carry a few dark or bright spots and scratches of 4-16 px
   (:mod:`anomalib_anomalyclip.testing.small_defects`);
2. scores each category's test split with the same prompts and CLIP three ways: **untiled** (the image resized to
   the input size), **tiles** (tiles of the input size at the working resolution, ``tiling.fusion="tiles"``) and
   **tiles + global** (``tiling.fusion="mean"``), zero-shot and with ``k`` normal references (the bank then holds the
   references' tokens of the same views);
3. reports image AUROC and pixel AUROC; every map is compared with the masks at ``eval_size`` (maps resized
   bilinearly, masks as the reference resizes them), so that untiled and tiled maps meet the same ground truth.

The CLIP is tiny and random: the numbers compare the views, they are not accuracy. Its patches keep the ratio that
matters: the working resolution is ``working_size / input_size`` (4 by default, 1536 / 518 = 3 for the real model)
times finer than the untiled view.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc

from anomalib_anomalyclip.config import Tiling
from anomalib_anomalyclip.integration.lightning_model import AnomalyCLIP
from anomalib_anomalyclip.integration.pre_processor import clip_pre_processor
from anomalib_anomalyclip.method.resize import resize_mask_like_pil
from anomalib_anomalyclip.method.tiling import TilingConfig, tiling_config
from anomalib_anomalyclip.testing.small_defects import SMALL_DEFECT_KINDS, SPLITS, small_defect_split

__all__ = [
    "SETTINGS",
    "Row",
    "TilingStudyConfig",
    "markdown_table",
    "mean_by_setting",
    "run_study",
    "tiled_arguments",
    "tiled_cost_lines",
]

SETTINGS = {"untiled": None, "tiles": "tiles", "tiles + global": "mean"}
"""Study setting -> ``tiling.fusion`` (``None``: untiled)."""
PIXEL_STEP = 4


@dataclass(frozen=True)
class TilingStudyConfig:
    """Sizes of the study.

    Attributes:
        seeds: data seeds (each generates its own categories).
        image_size: side of the generated images.
        input_size: the model's input size (and tile side).
        working_size: side of the working resolution of the tiled settings.
        stride: step between tiles.
        n_references: normal reference images per category (the bank of ``k_shot``).
        n_test: normal and defective test images per category (each).
        defects_per_image: defects of a defective image.
        defect_size: range of the defects' size in pixels of the generated image.
        eval_size: side of the maps and masks the pixel AUROC compares.
        shots: the ``k`` to evaluate (0: zero-shot).
        settings: the settings to evaluate (keys of :data:`SETTINGS`).
        model_args: further arguments of :class:`~anomalib_anomalyclip.AnomalyCLIP` (architecture of the CLIP).
    """

    seeds: Sequence[int] = (0, 1, 2)
    image_size: int = 1536
    input_size: int = 112
    working_size: int = 448
    stride: int = 112
    n_references: int = 4
    n_test: int = 4
    defects_per_image: int = 3
    defect_size: tuple[float, float] = (4.0, 16.0)
    eval_size: int = 768
    shots: Sequence[int] = (0, 4)
    settings: Sequence[str] = tuple(SETTINGS)
    model_args: tuple[tuple[str, object], ...] = ()

    def tiling(self, fusion: str) -> TilingConfig:
        """The tiling of a tiled setting."""
        settings = Tiling(working_size=self.working_size, fusion=fusion)
        return tiling_config(self.input_size, self.stride, self.input_size, settings)


@dataclass(frozen=True)
class Row:
    """One line of the study: a seed, a category, a setting, k, and the two AUROCs."""

    seed: int
    category: str
    kind: str
    setting: str
    k_shot: int
    image_auroc: float
    pixel_auroc: float


@dataclass
class _Category:
    references: torch.Tensor
    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def at(self, side: int) -> tuple[torch.Tensor, torch.Tensor]:
        """References and test images resized to ``side`` and normalised (computed once per side)."""
        if side not in self.inputs:
            transform = clip_pre_processor((side, side)).transform
            self.inputs[side] = (transform(self.references), torch.cat([transform(i[None]) for i in self.images]))
        return self.inputs[side]


def run_study(clip_path: Path, prompt_path: Path, config: TilingStudyConfig) -> list[Row]:
    """Rows for every seed, category, setting and ``k`` (see the module docstring)."""
    models = {k_shot: _model(clip_path, prompt_path, config, k_shot) for k_shot in config.shots}
    rows = []
    for seed in config.seeds:
        for category, kind in SMALL_DEFECT_KINDS.items():
            data = _category(category, kind, seed, config)
            for setting in config.settings:
                fusion = SETTINGS[setting]
                tiling = None if fusion is None else config.tiling(fusion)
                for k_shot, model in models.items():
                    image, pixel = _evaluate(model, tiling, data, config)
                    rows.append(Row(seed, category, kind, setting, k_shot, image, pixel))
    return rows


def _model(clip_path: Path, prompt_path: Path, config: TilingStudyConfig, k_shot: int) -> AnomalyCLIP:
    return AnomalyCLIP(
        pretrained=str(clip_path),
        prompt_weights=str(prompt_path),
        image_size=config.input_size,
        k_shot=k_shot,
        visualizer=False,
        evaluator=False,
        **dict(config.model_args),
    ).eval()


def _category(category: str, kind: str, seed: int, config: TilingStudyConfig) -> _Category:
    def split(name: str, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
        return small_defect_split(
            category, kind, name, count, config.image_size, config.defects_per_image, config.defect_size, seed
        )

    references, normal, defective = (
        split(SPLITS[0], config.n_references),
        split(SPLITS[1], config.n_test),
        split(SPLITS[2], config.n_test),
    )
    test = normal + defective
    masks = torch.from_numpy(np.stack([mask for _, mask in test]))
    return _Category(
        references=_images(references),
        images=_images(test),
        labels=torch.tensor([0] * len(normal) + [1] * len(defective)),
        masks=resize_mask_like_pil(masks, (config.eval_size, config.eval_size)),
    )


def _images(samples: list[tuple[np.ndarray, np.ndarray]]) -> torch.Tensor:
    """(N, 3, H, W) images in [0, 1], quantised to 8 bits as if read from PNG files."""
    stacked = torch.from_numpy(np.stack([np.moveaxis(image, -1, 0) for image, _ in samples]))
    return stacked.mul_(255).round_().div_(255)


def _evaluate(
    model: AnomalyCLIP, tiling: TilingConfig | None, data: _Category, config: TilingStudyConfig
) -> tuple[float, float]:
    """Image and pixel AUROC of ``model`` with ``tiling`` on one category."""
    torch_model = model.model
    torch_model.use_tiling(tiling)
    references, images = data.at(config.input_size if tiling is None else tiling.working_size[0])
    with torch.inference_mode():
        if torch_model.k_shot:
            torch_model.remember_references(references)
        outputs = [torch_model(image[None]) for image in images]
    scores = torch.cat([output.pred_score for output in outputs])
    maps = torch.cat([output.anomaly_map for output in outputs])
    maps = F.interpolate(maps, size=tuple(data.masks.shape[-2:]), mode="bilinear", align_corners=False)
    return float(binary_auroc(scores, data.labels)), pixel_auroc(maps[:, 0], data.masks)


def pixel_auroc(maps: torch.Tensor, masks: torch.Tensor, step: int = PIXEL_STEP) -> float:
    """Pixel AUROC of maps (N, H, W) against boolean masks (N, H, W), estimated.

    Every anomalous pixel counts, and every ``step``-th normal pixel along each axis (the maps are smooth: the estimate
    differs from the full count by well under 0.01, and is many times faster).
    """
    anomalous = maps[masks]
    normal = maps[:, ::step, ::step][~masks[:, ::step, ::step]]
    labels = torch.cat([torch.ones_like(anomalous), torch.zeros_like(normal)]).long()
    return float(binary_auroc(torch.cat([anomalous, normal]), labels))


def mean_by_setting(rows: Sequence[Row]) -> dict[tuple[str, int], tuple[float, float]]:
    """Mean (image, pixel) AUROC over seeds and categories, per (setting, k)."""
    groups: dict[tuple[str, int], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.setting, row.k_shot), []).append(row)
    return {
        key: (float(np.mean([row.image_auroc for row in group])), float(np.mean([row.pixel_auroc for row in group])))
        for key, group in groups.items()
    }


def markdown_table(rows: Sequence[Row]) -> str:
    """Image / pixel AUROC (percent, mean over seeds and categories, with the smallest seed mean) per setting and k."""
    means = mean_by_setting(rows)
    shots = sorted({row.k_shot for row in rows})
    header = ["setting", *(f"k = {k} (image / pixel)" for k in shots)]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for setting in sorted({row.setting for row in rows}, key=list(SETTINGS).index):
        cells = []
        for k_shot in shots:
            image, pixel = means[(setting, k_shot)]
            worst = min(_seed_means(rows, setting, k_shot))
            cells.append(f"{100 * image:.1f} / {100 * pixel:.1f} (worst seed pixel {100 * worst:.1f})")
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _seed_means(rows: Sequence[Row], setting: str, k_shot: int) -> list[float]:
    seeds = sorted({row.seed for row in rows})
    return [
        float(np.mean([r.pixel_auroc for r in rows if (r.seed, r.setting, r.k_shot) == (seed, setting, k_shot)]))
        for seed in seeds
    ]


def tiled_arguments(input_size: int, tiles: int) -> dict[str, object]:
    """Model arguments for ``tiles`` (a square number) non-overlapping tiles per image (nothing for 0)."""
    if not tiles:
        return {}
    side = round(tiles**0.5)
    if side * side != tiles:
        raise ValueError(f"A tiled benchmark flavour takes a square number of tiles, got {tiles}.")
    return {"tiling": Tiling(enabled=True, working_size=side * input_size)}


def tiled_cost_lines(rows: Sequence[dict], tiles_of: dict[str, int], baseline: str) -> str:
    """For each tiled row of a benchmark table, its time per image against (tiles + 1) times the untiled one."""
    untiled = {row["batch_size"]: row for row in rows if row["flavour"] == baseline}
    lines = []
    for row in rows:
        tiles = tiles_of.get(row["flavour"], 0)
        reference = untiled.get(row["batch_size"])
        if not tiles or reference is None:
            continue
        expected = (tiles + 1) * reference["seconds_per_image"]
        lines.append(
            f"{row['flavour']} batch {row['batch_size']}: {row['seconds_per_image']:.3g} s/image = "
            f"{row['seconds_per_image'] / expected:.2f} x ({tiles} tiles + 1) x untiled "
            f"({reference['seconds_per_image']:.3g} s); peak {row['peak_mb']:.0f} MB vs {reference['peak_mb']:.0f} MB"
        )
    return "\n".join(lines)

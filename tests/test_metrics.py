"""The paper's AUPRO against a direct reimplementation of its definition (numpy, skimage, sklearn)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from anomalib.metrics import AUPRO
from skimage.measure import label, regionprops
from sklearn.metrics import auc

from anomalib_anomalyclip.integration.lightning_model import AnomalyCLIP
from anomalib_anomalyclip.integration.metrics import PaperAUPRO


def definition_aupro(masks: np.ndarray, maps: np.ndarray, steps: int = 200, fpr_limit: float = 0.3) -> float:
    """The paper's AUPRO written out plainly: a loop over thresholds, regions from skimage, sklearn's auc."""
    low, high = float(maps.min()), float(maps.max())
    delta = (high - low) / steps
    regions = [(index, region) for index, mask in enumerate(masks) for region in regionprops(label(mask))]
    normal = ~masks
    pros, fprs = [], []
    for step in range(steps):
        found = maps > low + step * delta
        overlaps = [found[index][tuple(region.coords.T)].sum() / region.area for index, region in regions]
        pros.append(np.mean(overlaps))
        fprs.append(np.logical_and(normal, found).sum() / normal.sum())
    pros, fprs = np.array(pros), np.array(fprs)
    kept = fprs < fpr_limit
    rescaled = (fprs[kept] - fprs[kept].min()) / (fprs[kept].max() - fprs[kept].min())
    return float(auc(rescaled, pros[kept]))


def _fixed_maps(seed: int, size: int = 64, images: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Masks with discs, 1-pixel lines (diagonal ones are 8- but not 4-connected) and normal images; noisy maps."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size]
    masks = np.zeros((images, size, size), dtype=bool)
    for index in range(images - 3):  # the last three images are normal
        for _ in range(rng.integers(1, 4)):
            row, col, radius = rng.integers(8, size - 8), rng.integers(8, size - 8), rng.integers(2, 7)
            masks[index] |= (rows - row) ** 2 + (cols - col) ** 2 <= radius**2
        start, length = rng.integers(0, size // 2, 2), rng.integers(10, size // 2)
        diagonal = np.arange(length)
        masks[index, start[0] + diagonal, start[1] + diagonal] = True  # a thin diagonal scratch
        masks[index, rng.integers(0, size), 5 : 5 + length] = True  # a thin horizontal one
    maps = rng.normal(0, 1, masks.shape) + masks * rng.uniform(0.5, 2.5, (images, 1, 1))
    return masks, maps.astype(np.float32)


def _paper_aupro(masks: np.ndarray, maps: np.ndarray, batch_size: int = 3) -> float:
    metric = PaperAUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_")
    for start in range(0, len(maps), batch_size):
        batch = SimpleNamespace(
            anomaly_map=torch.from_numpy(maps[start : start + batch_size]).unsqueeze(1),
            gt_mask=torch.from_numpy(masks[start : start + batch_size]),
        )
        metric.update(batch)
    return float(metric.compute())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paper_aupro_equals_its_definition(seed: int) -> None:
    masks, maps = _fixed_maps(seed)
    expected = definition_aupro(masks, maps.astype(np.float64))
    assert 0.2 < expected < 1.0
    assert _paper_aupro(masks, maps) == pytest.approx(expected, abs=1e-6)


def test_paper_aupro_differs_from_anomalibs() -> None:
    """anomalib's AUPRO (exact curve, no rescaling) is another number on the same maps."""
    masks, maps = _fixed_maps(0)
    anomalib_aupro = AUPRO(fields=["anomaly_map", "gt_mask"])
    anomalib_aupro.update(SimpleNamespace(anomaly_map=torch.from_numpy(maps), gt_mask=torch.from_numpy(masks)))
    assert abs(float(anomalib_aupro.compute()) - _paper_aupro(masks, maps)) > 1e-3


def test_paper_aupro_is_nan_where_the_definition_is() -> None:
    masks, maps = _fixed_maps(0)
    assert np.isnan(_paper_aupro(np.zeros_like(masks), maps))  # no anomalous region
    assert np.isnan(_paper_aupro(masks, np.zeros_like(maps)))  # constant maps: one FPR only


def test_evaluator_reports_both_aupros() -> None:
    names = [metric.name for metric in AnomalyCLIP.configure_evaluator().test_metrics]
    assert {"pixel_AUPRO", "pixel_AUPRO_paper"} <= set(names)

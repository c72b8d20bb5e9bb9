"""The AUPRO of the AnomalyCLIP paper's evaluation script, as an anomalib metric.

anomalib's :class:`~anomalib.metrics.AUPRO` integrates the per-region overlap (PRO) curve exactly up to a false
positive rate of 0.3 and divides by 0.3. The paper's script (``cal_pro_score`` of the reference implementation)
samples the curve instead, and reads 0.05-0.75 points lower on the same maps. :class:`PaperAUPRO` computes the
latter, from its definition:

1. ``num_thresholds`` (200) thresholds ``t_k = lo + k (hi - lo) / num_thresholds``, ``k = 0 .. 199``, where ``lo``
   and ``hi`` are the smallest and largest value of all anomaly maps; a pixel is anomalous at ``t_k`` when its
   value is above ``t_k``.
2. Per threshold, PRO is the mean over all connected regions of the ground-truth masks (8-connected, each image on
   its own: ``skimage.measure.label``'s default) of the fraction of the region's pixels found anomalous; the FPR is
   the fraction of all normal pixels found anomalous.
3. The points with FPR below ``fpr_limit`` (0.3) are kept, their FPRs are rescaled linearly to [0, 1] (minimum to 0,
   maximum to 1) and PRO is integrated over them with the trapezoidal rule, in the order of the thresholds.

The result is ``nan`` where the script's is undefined: no anomalous or no normal pixel, or fewer than two distinct
FPRs below the limit. The counting is vectorised: each pixel's value is compared with all thresholds at once by a
sorted search, and the counts of pixels above each threshold are cumulative sums of histograms.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from anomalib.metrics import AUPR, AUPRO, AUROC, AnomalibMetric, Evaluator, F1Max
from scipy import ndimage
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

__all__ = ["PaperAUPRO", "anomalyclip_evaluator"]

CHUNK_IMAGES = 32
"""Images counted at a time (bounds the float64 copies and label arrays of :meth:`_PaperAUPRO.compute`)."""

# 8-connected regions in each image of a stack (no connection across images).
_PLANE_CONNECTIVITY = np.zeros((3, 3, 3), dtype=bool)
_PLANE_CONNECTIVITY[1] = True


class _PaperAUPRO(Metric):
    """The paper's AUPRO on anomaly maps and ground-truth masks (see the module's documentation).

    Args:
        num_thresholds: thresholds evenly spaced from the smallest map value (included) to the largest (excluded).
        fpr_limit: points of the PRO curve with a false positive rate below it are integrated.
        **kwargs: passed on to :class:`torchmetrics.Metric`.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    preds: list[torch.Tensor]
    target: list[torch.Tensor]

    def __init__(self, num_thresholds: int = 200, fpr_limit: float = 0.3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_thresholds = num_thresholds
        self.fpr_limit = fpr_limit
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of anomaly maps and masks of the same size, ``(B, H, W)`` or ``(B, 1, H, W)``."""
        self.preds.append(preds.detach().reshape(-1, *preds.shape[-2:]).float())
        self.target.append(target.detach().reshape(-1, *target.shape[-2:]).bool())

    def compute(self) -> torch.Tensor:
        """The area under the rescaled PRO curve up to ``fpr_limit``, in [0, 1] (``nan`` where undefined)."""
        maps, masks = dim_zero_cat(self.preds).cpu(), dim_zero_cat(self.target).cpu()
        pro, fpr = pro_and_fpr_curves(maps, masks, self.num_thresholds)
        return area_under_rescaled_curve(pro, fpr, self.fpr_limit)


class PaperAUPRO(AnomalibMetric, _PaperAUPRO):  # type: ignore[misc]
    """The paper's AUPRO for anomalib's ``Evaluator``, named ``<prefix>AUPRO_paper``.

    Example:
        >>> from anomalib.metrics import Evaluator
        >>> metric = PaperAUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False)
        >>> metric.name
        'pixel_AUPRO_paper'
    """

    default_fields = ("anomaly_map", "gt_mask")

    def __init__(self, *args: Any, prefix: str = "", **kwargs: Any) -> None:
        super().__init__(*args, prefix=prefix, **kwargs)
        self.name = f"{prefix}AUPRO_paper"


def thresholds_of(maps: torch.Tensor, num_thresholds: int) -> torch.Tensor:
    """``num_thresholds`` thresholds from the smallest map value up to (not including) the largest, in float64."""
    low, high = maps.min().double(), maps.max().double()
    step = (high - low) / num_thresholds
    return low + step * torch.arange(num_thresholds, dtype=torch.float64)


def pro_and_fpr_curves(
    maps: torch.Tensor, masks: torch.Tensor, num_thresholds: int = 200
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean per-region overlap and false positive rate at each threshold of :func:`thresholds_of`.

    Args:
        maps: anomaly maps ``(N, H, W)``.
        masks: ground-truth masks ``(N, H, W)``, true on anomalous pixels.
        num_thresholds: number of thresholds.

    Returns:
        PRO and FPR per threshold (float64, ``num_thresholds`` values each; ``nan`` without regions or normal
        pixels).
    """
    thresholds = thresholds_of(maps, num_thresholds)
    normal_above = torch.zeros(num_thresholds, dtype=torch.float64)
    region_above, region_areas = [], []
    for chunk_maps, chunk_masks in _chunks(maps, masks):
        normal_above += _above_counts(chunk_maps[~chunk_masks], thresholds).sum(0)
        above, areas = _region_counts(chunk_maps, chunk_masks, thresholds)
        region_above.append(above)
        region_areas.append(areas)
    above, areas = torch.cat(region_above), torch.cat(region_areas)
    pro = (above / areas[:, None]).mean(0) if len(areas) else torch.full((num_thresholds,), torch.nan)
    fpr = normal_above / (~masks).sum()
    return pro, fpr


def _chunks(maps: torch.Tensor, masks: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    yield from zip(maps.split(CHUNK_IMAGES), masks.split(CHUNK_IMAGES), strict=True)


def _above_counts(values: torch.Tensor, thresholds: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    """Per group (one group without ``groups``): how many values lie above each threshold, ``(G, T)`` float64.

    A value lies above ``t_k`` for every ``k`` below the number of thresholds smaller than it, so the counts are
    reversed cumulative sums of the histogram of those numbers.
    """
    bins = len(thresholds) + 1
    below = torch.searchsorted(thresholds, values.double().contiguous(), side="left")
    groups = torch.zeros_like(below) if groups is None else groups
    num_groups = int(groups.max()) + 1 if groups.numel() else 0
    histogram = torch.bincount(groups * bins + below, minlength=num_groups * bins).reshape(num_groups, bins)
    above = histogram.flip(1).cumsum(1).flip(1)[:, 1:]
    return above.double()


def _region_counts(
    maps: torch.Tensor, masks: torch.Tensor, thresholds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels above each threshold ``(R, T)`` and area ``(R,)`` of each connected region of ``masks``."""
    labels, count = ndimage.label(masks.numpy(), structure=_PLANE_CONNECTIVITY)
    if count == 0:
        return torch.zeros(0, len(thresholds), dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    regions = torch.from_numpy(labels).long()[masks] - 1
    areas = torch.bincount(regions, minlength=count).double()
    return _above_counts(maps[masks], thresholds, regions), areas


def area_under_rescaled_curve(pro: torch.Tensor, fpr: torch.Tensor, fpr_limit: float = 0.3) -> torch.Tensor:
    """Trapezoidal area under PRO over FPR for the points below ``fpr_limit``, FPR rescaled to [0, 1].

    Args:
        pro: PRO per threshold, in the order of increasing thresholds.
        fpr: FPR per threshold, same order (so not increasing).
        fpr_limit: points with an FPR below it are used.

    Returns:
        The area, float32 (``nan`` with fewer than two distinct FPRs below the limit or an undefined curve).
    """
    kept = fpr < fpr_limit
    pro, fpr = pro[kept].flip(0), fpr[kept].flip(0)  # increasing FPR; ties keep the order of the thresholds
    if len(fpr) < 2 or fpr.max() == fpr.min() or pro.isnan().any():
        return torch.tensor(torch.nan)
    fpr = (fpr - fpr.min()) / (fpr.max() - fpr.min())
    return torch.trapezoid(pro, fpr).float()


def anomalyclip_evaluator() -> Evaluator:
    """Image AUROC, AP and F1-max; pixel AUROC, AUPRO (anomalib's and the paper's, :class:`PaperAUPRO`) and F1-max."""
    image_fields = ["pred_score", "gt_label"]
    pixel_fields = ["anomaly_map", "gt_mask"]
    test_metrics = [
        AUROC(fields=image_fields, prefix="image_"),
        AUPR(fields=image_fields, prefix="image_"),
        F1Max(fields=image_fields, prefix="image_"),
        AUROC(fields=pixel_fields, prefix="pixel_", strict=False),
        AUPRO(fields=pixel_fields, prefix="pixel_", strict=False),
        PaperAUPRO(fields=pixel_fields, prefix="pixel_", strict=False),
        F1Max(fields=pixel_fields, prefix="pixel_", strict=False),
    ]
    return Evaluator(test_metrics=test_metrics)

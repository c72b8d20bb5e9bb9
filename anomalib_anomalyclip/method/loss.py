"""AnomalyCLIP's glocal loss: image cross-entropy plus focal and dice losses on the maps.

``loss = CE(image logits, label) + local_weight * sum over layers of
[focal(P, mask) + dice(P_abnormal, mask) + dice(P_normal, 1 - mask)]``

``P`` are a layer's up-sampled (normal, abnormal) probability maps before smoothing.
The constants follow the reference implementation (focal: gamma 2, no class weights,
label clamp and ``pt`` offset 1e-5; dice: smoothing 1). Images without a ground-truth
mask (datasets with image labels only) contribute to the image term alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

LossName = Literal["glocal", "global", "local"]


class LossVariant(str, Enum):
    """Which terms are trained: both (the method), the image term or the map terms."""

    GLOCAL = "glocal"
    GLOBAL = "global"
    LOCAL = "local"


def focal_loss(
    probabilities: torch.Tensor, mask: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5
) -> torch.Tensor:
    """Focal loss on two-class probability maps, as the reference computes it.

    Args:
        probabilities: (B, 2, H, W) softmax probabilities (normal, abnormal).
        mask: (B, H, W) ground truth, 1 where abnormal.
        gamma: focusing exponent.
        smooth: label clamp and offset added to ``pt`` before the log.

    Returns:
        The mean loss over all pixels.
    """
    target = torch.stack([1 - mask, mask], dim=1).to(probabilities.dtype).clamp(smooth, 1 - smooth)
    pt = (target * probabilities).sum(dim=1) + smooth
    return (-((1 - pt) ** gamma) * pt.log()).mean()


def dice_loss(prediction: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """``1 - mean over images of (2 |p g| + s) / (|p| + |g| + s)``.

    Args:
        prediction: (B, H, W) probabilities.
        target: (B, H, W) binary ground truth.
        smooth: the smoothing constant ``s``.
    """
    prediction = prediction.flatten(1)
    target = target.flatten(1).to(prediction.dtype)
    coefficient = (2 * (prediction * target).sum(1) + smooth) / (prediction.sum(1) + target.sum(1) + smooth)
    return 1 - coefficient.mean()


def local_loss(layer_probabilities: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Sum over layers of focal + dice(abnormal, mask) + dice(normal, 1 - mask)."""
    mask = mask.float()
    total = mask.new_zeros(())
    for probabilities in layer_probabilities:
        total = total + focal_loss(probabilities, mask)
        total = total + dice_loss(probabilities[:, 1], mask)
        total = total + dice_loss(probabilities[:, 0], 1 - mask)
    return total


class GlocalLoss(nn.Module):
    """The training objective.

    Args:
        variant: ``glocal`` (default), ``global`` (image term only) or ``local`` (map terms only).
        local_weight: factor of the map terms. 4 in the released runs, where it stands
            for four identical layer maps.
    """

    def __init__(self, variant: LossVariant | str = LossVariant.GLOCAL, local_weight: float = 4.0) -> None:
        super().__init__()
        self.variant = LossVariant(variant)
        self.local_weight = local_weight

    def forward(
        self,
        image_logits: torch.Tensor,
        labels: torch.Tensor,
        layer_probabilities: Sequence[torch.Tensor],
        masks: torch.Tensor | None,
        has_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Compute the loss terms.

        Args:
            image_logits: (B, 2) cosine similarities / temperature.
            labels: (B,) 0 normal, 1 abnormal.
            layer_probabilities: per layer (B, 2, H, W) up-sampled probabilities.
            masks: (B, H, W) binary masks, or ``None`` when no image has one.
            has_mask: (B,) which images have a real mask; ``None`` means all of them.

        Returns:
            ``loss`` (what to minimise), ``image_loss`` and ``local_loss`` (weighted).
        """
        image_loss = F.cross_entropy(image_logits, labels.long())
        if self.variant is LossVariant.GLOBAL:
            weighted_local = image_logits.new_zeros(())
        else:
            weighted_local = self._weighted_local(layer_probabilities, masks, has_mask, image_logits)
        if self.variant is LossVariant.GLOBAL:
            total = image_loss
        elif self.variant is LossVariant.LOCAL:
            total = weighted_local
        else:
            total = image_loss + weighted_local
        return {"loss": total, "image_loss": image_loss.detach(), "local_loss": weighted_local.detach()}

    def _weighted_local(
        self,
        layer_probabilities: Sequence[torch.Tensor],
        masks: torch.Tensor | None,
        has_mask: torch.Tensor | None,
        reference: torch.Tensor,
    ) -> torch.Tensor:
        if masks is None or not layer_probabilities:
            return reference.new_zeros(())
        if has_mask is not None:
            if not bool(has_mask.any()):
                return reference.new_zeros(())
            masks = masks[has_mask]
            layer_probabilities = [probabilities[has_mask] for probabilities in layer_probabilities]
        return self.local_weight * local_loss(layer_probabilities, masks)

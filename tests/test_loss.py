"""Focal, dice and glocal loss values on small hand-checked inputs."""

from __future__ import annotations

import math

import pytest
import torch

from anomalib_anomalyclip.method.loss import GlocalLoss, dice_loss, focal_loss, local_loss


def _focal_by_hand(p_abnormal: float, label: int) -> float:
    smooth = 1e-5
    target_abnormal = 1 - smooth if label else smooth
    pt = (1 - target_abnormal) * (1 - p_abnormal) + target_abnormal * p_abnormal + smooth
    return -((1 - pt) ** 2) * math.log(pt)


def test_focal_loss_matches_hand_computation() -> None:
    p_abnormal = torch.tensor([0.8, 0.1, 0.5, 0.99])
    labels = torch.tensor([1.0, 1.0, 0.0, 0.0])
    probabilities = torch.stack([1 - p_abnormal, p_abnormal]).view(1, 2, 2, 2)
    expected = sum(_focal_by_hand(p, int(y)) for p, y in zip(p_abnormal.tolist(), labels.tolist(), strict=True)) / 4
    assert focal_loss(probabilities, labels.view(1, 2, 2)).item() == pytest.approx(expected, rel=1e-5)


def test_focal_loss_is_small_for_confident_correct_pixels() -> None:
    confident = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)
    assert focal_loss(confident, torch.ones(1, 1, 1)).item() < 1e-8


def test_dice_loss_matches_hand_computation() -> None:
    prediction = torch.tensor([[[1.0, 0.5], [0.0, 0.0]], [[0.2, 0.2], [0.2, 0.2]]])
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    first = (2 * 1.5 + 1) / (1.5 + 2 + 1)
    second = (0 + 1) / (0.8 + 0 + 1)
    assert dice_loss(prediction, target).item() == pytest.approx(1 - (first + second) / 2, rel=1e-6)


def test_local_loss_sums_focal_and_both_dice_terms_over_layers() -> None:
    generator = torch.Generator().manual_seed(0)
    p_abnormal = torch.rand(2, 4, 4, generator=generator)
    probabilities = torch.stack([1 - p_abnormal, p_abnormal], dim=1)
    mask = (torch.rand(2, 4, 4, generator=generator) > 0.5).float()
    one_layer = focal_loss(probabilities, mask) + dice_loss(p_abnormal, mask) + dice_loss(1 - p_abnormal, 1 - mask)
    torch.testing.assert_close(local_loss([probabilities, probabilities], mask), 2 * one_layer)


def _batch() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 2, generator=generator)
    labels = torch.tensor([0, 1, 1])
    p_abnormal = torch.rand(3, 5, 5, generator=generator)
    probabilities = [torch.stack([1 - p_abnormal, p_abnormal], dim=1)]
    masks = torch.zeros(3, 5, 5)
    masks[1:, 1:3, 1:3] = 1
    return logits, labels, probabilities, masks


def test_glocal_loss_is_cross_entropy_plus_weighted_local_loss() -> None:
    logits, labels, probabilities, masks = _batch()
    terms = GlocalLoss(local_weight=4)(logits, labels, probabilities, masks)
    image = torch.nn.functional.cross_entropy(logits, labels)
    local = 4 * local_loss(probabilities, masks)
    torch.testing.assert_close(terms["image_loss"], image)
    torch.testing.assert_close(terms["local_loss"], local)
    torch.testing.assert_close(terms["loss"], image + local)


@pytest.mark.parametrize(("variant", "uses_image", "uses_local"), [("global", True, False), ("local", False, True)])
def test_loss_variants_keep_only_their_terms(variant: str, uses_image: bool, uses_local: bool) -> None:
    logits, labels, probabilities, masks = _batch()
    glocal = GlocalLoss()(logits, labels, probabilities, masks)
    terms = GlocalLoss(variant)(logits, labels, probabilities, masks)
    expected = uses_image * glocal["image_loss"] + uses_local * glocal["local_loss"]
    torch.testing.assert_close(terms["loss"], expected)


def test_images_without_masks_train_with_the_image_loss_only() -> None:
    logits, labels, probabilities, masks = _batch()
    has_mask = torch.tensor([True, False, True])
    terms = GlocalLoss()(logits, labels, probabilities, masks, has_mask)
    kept = [p[has_mask] for p in probabilities]
    torch.testing.assert_close(terms["local_loss"], 4 * local_loss(kept, masks[has_mask]))
    none = GlocalLoss()(logits, labels, probabilities, masks, torch.zeros(3, dtype=torch.bool))
    assert none["local_loss"].item() == 0
    torch.testing.assert_close(none["loss"], none["image_loss"])

"""The composed torch model: outputs, text-feature caching, training outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anomalib_anomalyclip.method.loss import GlocalLoss
from anomalib_anomalyclip.method.prompts import save_prompts
from anomalib_anomalyclip.method.torch_model import AnomalyCLIPModel, TrainingOutput


@pytest.fixture(scope="module")
def model(tiny_clip_path: Path) -> AnomalyCLIPModel:
    torch.manual_seed(0)
    return AnomalyCLIPModel(pretrained=tiny_clip_path, image_size=56).eval()


@pytest.mark.parametrize(("size", "layers", "upper"), [((56, 56), None, 1.0), ((84, 70), (6, 12, 18, 24), 4.0)])
def test_scores_and_maps_have_the_documented_shape_and_range(tiny_clip_path: Path, size, layers, upper: float) -> None:
    model = AnomalyCLIPModel(pretrained=tiny_clip_path, image_size=size[0], feature_layers=layers).eval()
    with torch.no_grad():
        batch = model(torch.randn(3, 3, *size, generator=torch.Generator().manual_seed(1)))
    assert batch.pred_score.shape == (3,)
    assert batch.anomaly_map.shape == (3, 1, *size)
    assert ((batch.pred_score >= 0) & (batch.pred_score <= 1)).all()
    assert batch.anomaly_map.min() >= 0 and batch.anomaly_map.max() <= upper
    assert batch.anomaly_map.std() > 0


def test_text_features_follow_prompt_updates(model: AnomalyCLIPModel) -> None:
    images = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(images).pred_score
        cached = model.text_features.clone()
        assert torch.equal(model(images).pred_score, before)
        model.prompt_learner.abnormal_context.add_(torch.randn_like(model.prompt_learner.abnormal_context))
        after = model(images).pred_score
    assert not torch.allclose(model.text_features, cached)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(model.text_features, model.encode_text().detach())


def test_prompt_weights_are_loaded_at_construction(
    tiny_clip_path: Path, model: AnomalyCLIPModel, tmp_path: Path
) -> None:
    path = save_prompts(model.prompt_learner, tmp_path / "prompts.pt")
    loaded = AnomalyCLIPModel(pretrained=tiny_clip_path, prompt_weights=path).eval()
    images = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images).anomaly_map, model(images).anomaly_map)


def test_training_outputs_only_differentiate_the_prompts(tiny_clip_path: Path) -> None:
    model = AnomalyCLIPModel(pretrained=tiny_clip_path, image_size=56).train()
    outputs = model(torch.randn(2, 3, 56, 56))
    assert isinstance(outputs, TrainingOutput)
    assert outputs.image_logits.shape == (2, 2)
    assert [p.shape for p in outputs.layer_probabilities] == [(2, 2, 56, 56)]
    loss = GlocalLoss()(outputs.image_logits, torch.tensor([0, 1]), outputs.layer_probabilities, torch.zeros(2, 56, 56))
    loss["loss"].backward()
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable and all(name.startswith("prompt_learner.") for name in trainable)
    assert all(parameter.grad is not None for parameter in model.prompt_learner.parameters())


def test_training_matches_inference_before_smoothing(model: AnomalyCLIPModel) -> None:
    images = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        batch = model(images)
        outputs = model.training_outputs(images)
    torch.testing.assert_close(outputs.image_logits.softmax(-1)[:, 1], batch.pred_score)
    raw = (outputs.layer_probabilities[0][:, 1:] + 1 - outputs.layer_probabilities[0][:, :1]) / 2
    torch.testing.assert_close(model.smoothing(raw), batch.anomaly_map, atol=1e-5, rtol=1e-4)


def test_object_aware_training_uses_each_image_class(tiny_clip_path: Path) -> None:
    model = AnomalyCLIPModel(pretrained=tiny_clip_path, prompt_type="object_aware")
    features = torch.randn(3, 32), [torch.randn(3, 16, 32)]
    with torch.no_grad():
        mixed = model.outputs_from_features(*features, size=(56, 56), class_names=["bottle", "cable", "bottle"])
        bottle = model.outputs_from_features(*features, size=(56, 56), class_names=["bottle"] * 3)
    torch.testing.assert_close(mixed.image_logits[[0, 2]], bottle.image_logits[[0, 2]])
    assert not torch.allclose(mixed.image_logits[1], bottle.image_logits[1])

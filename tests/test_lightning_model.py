"""The anomalib module: learning type, checkpoint contents, prompt checks, training batches."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from anomalib import LearningType

from anomalib_anomalyclip.lightning_model import (
    AnomalyCLIP,
    PromptsUnavailableError,
    _check_training_data,
    _masks_and_presence,
)
from anomalib_anomalyclip.prompts import PromptCheckpointError, PromptConfig, PromptLearner, save_prompts


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(5)
    return save_prompts(PromptLearner(PromptConfig(width=64)), tmp_path_factory.mktemp("prompts") / "prompts.pt")


def _model(tiny_clip_path: Path, **kwargs) -> AnomalyCLIP:
    return AnomalyCLIP(pretrained=str(tiny_clip_path), image_size=56, **kwargs)


def test_learning_type_follows_the_prompt_source(tiny_clip_path: Path, prompt_file: Path) -> None:
    assert _model(tiny_clip_path).learning_type is LearningType.ONE_CLASS
    zero_shot = _model(tiny_clip_path, prompt_weights=str(prompt_file))
    assert zero_shot.learning_type is LearningType.ZERO_SHOT
    assert zero_shot.trainer_arguments == {}
    fine_tune = _model(tiny_clip_path, prompt_weights=str(prompt_file), train_prompts=True, epochs=3)
    assert fine_tune.learning_type is LearningType.ONE_CLASS
    assert fine_tune.trainer_arguments["max_epochs"] == 3


def test_default_pre_processor_resizes_to_image_size(tiny_clip_path: Path) -> None:
    model = _model(tiny_clip_path)
    assert tuple(model.input_size) == (56, 56)


def test_untrained_prompts_are_never_used_silently(tiny_clip_path: Path) -> None:
    model = _model(tiny_clip_path, train_prompts=True)
    for hook in (model.on_test_start, model.on_predict_start, model.on_validation_start):
        with pytest.raises(PromptsUnavailableError, match=r"--model\.prompt_weights anomalyclip-mvtec"):
            hook()


def test_checkpoint_keeps_prompts_and_drops_the_frozen_clip(tiny_clip_path: Path, prompt_file: Path) -> None:
    model = _model(tiny_clip_path, prompt_weights=str(prompt_file))
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(checkpoint)
    keys = set(checkpoint["state_dict"])
    assert any(key.startswith("model.prompt_learner.") for key in keys)
    assert not any(key.startswith(("model.visual_encoder.", "model.text_encoder.")) for key in keys)
    prompt_bytes = sum(value.numel() * value.element_size() for value in checkpoint["state_dict"].values())
    assert prompt_bytes < 100_000
    assert checkpoint["anomalyclip"]["prompts_trained"] is True

    restored = _model(tiny_clip_path)
    restored.on_load_checkpoint(checkpoint)
    restored.load_state_dict(checkpoint["state_dict"], strict=False)
    assert restored.learning_type is LearningType.ZERO_SHOT
    restored.on_test_start()  # prompts are available now
    for name, tensor in model.model.prompt_learner.state_dict().items():
        assert torch.equal(restored.model.prompt_learner.state_dict()[name], tensor)


def test_checkpoint_of_another_configuration_fails_clearly(tiny_clip_path: Path, prompt_file: Path) -> None:
    model = _model(tiny_clip_path, prompt_weights=str(prompt_file))
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": {}}
    model.on_save_checkpoint(checkpoint)
    with pytest.raises(PromptCheckpointError, match="n_ctx=12 context vectors, the model n_ctx=8"):
        _model(tiny_clip_path, n_ctx=8).on_load_checkpoint(checkpoint)
    with pytest.raises(PromptCheckpointError, match="no AnomalyCLIP prompts"):
        _model(tiny_clip_path).on_load_checkpoint({"state_dict": {"model.other": torch.zeros(1)}})


def test_wrong_prompt_weights_fail_at_construction(tiny_clip_path: Path, tmp_path: Path) -> None:
    save_prompts(PromptLearner(PromptConfig(width=64, n_ctx=5)), tmp_path / "short.pt")
    with pytest.raises(PromptCheckpointError, match="n_ctx=5"):
        _model(tiny_clip_path, prompt_weights=str(tmp_path / "short.pt"))


def test_anomalous_images_without_mask_train_with_the_image_loss_only() -> None:
    batch = SimpleNamespace(
        gt_mask=torch.zeros(4, 8, 8, dtype=torch.bool),
        gt_label=torch.tensor([False, True, True, False]),
        mask_path=["", "/data/cat/ground_truth/cut/000_mask.png", "", ""],
    )
    masks, has_mask = _masks_and_presence(batch)
    assert masks.dtype == torch.float32 and masks.shape == (4, 8, 8)
    assert has_mask.tolist() == [True, True, False, True]


def test_training_on_normal_images_only_is_refused() -> None:
    normal_only = SimpleNamespace(train_data=SimpleNamespace(samples=pd.DataFrame({"label_index": [0, 0, 0]})))
    with pytest.raises(ValueError, match="only normal images"):
        _check_training_data(normal_only)
    labelled = SimpleNamespace(train_data=SimpleNamespace(samples=pd.DataFrame({"label_index": [0, 1]})))
    _check_training_data(labelled)


def test_training_steps_lower_the_loss_on_a_fixed_batch(tiny_clip_path: Path) -> None:
    torch.manual_seed(0)
    model = _model(tiny_clip_path)
    images = torch.randn(4, 3, 56, 56)
    masks = torch.zeros(4, 56, 56, dtype=torch.bool)
    masks[2:, 10:30, 10:30] = True
    batch = SimpleNamespace(
        image=images, gt_label=torch.tensor([0, 0, 1, 1]), gt_mask=masks, mask_path=["", "", "m2.png", "m3.png"]
    )
    model.log = lambda *args, **kwargs: None
    optimizer = model.configure_optimizers()
    losses = []
    for _ in range(8):
        loss = model.training_step(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]

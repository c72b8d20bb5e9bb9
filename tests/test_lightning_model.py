"""The anomalib module: learning type, checkpoint contents, prompt checks, training batches."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from anomalib import LearningType

from anomalib_anomalyclip.data.samples import has_pixel_mask
from anomalib_anomalyclip.integration.lightning_model import AnomalyCLIP, PromptsUnavailableError
from anomalib_anomalyclip.integration.prompt_plan import plan_prompts
from anomalib_anomalyclip.method.prompts import PromptCheckpointError, PromptConfig, PromptLearner, save_prompts


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
    assert has_pixel_mask(batch).tolist() == [True, True, False, True]


class MVTecAD(SimpleNamespace):
    """Stands in for anomalib's MVTecAD (the released prompts are chosen by the datamodule's class name)."""


def test_the_prompt_plan_learns_loads_released_prompts_or_refuses() -> None:
    normal_only = MVTecAD(train_data=SimpleNamespace(samples=pd.DataFrame({"label_index": [0, 0, 0]})))
    labelled = SimpleNamespace(train_data=SimpleNamespace(samples=pd.DataFrame({"label_index": [0, 1]})))
    # Nothing given: learn from labelled data, else the released prompts trained on the other dataset.
    assert plan_prompts(None, None, 0, ready=False, fitting=True, datamodule=labelled).learn
    released = plan_prompts(None, None, 0, ready=False, fitting=True, datamodule=normal_only)
    assert not released.learn and released.released.name == "anomalyclip-visa"
    assert "holds only normal images" in released.reason
    assert plan_prompts(None, None, 0, ready=False, fitting=False, datamodule=labelled).released.name == (
        "anomalyclip-mvtec"
    )
    # Prompts given, loaded from a checkpoint, or a few-shot model: nothing to learn or load.
    assert plan_prompts("p.pt", None, 0, ready=True, fitting=True, datamodule=labelled) == plan_prompts(
        None, None, 4, ready=True, fitting=True, datamodule=labelled
    )
    assert not plan_prompts(None, None, 0, ready=True, fitting=False).released
    # Asked to train on normal images only: refused.
    with pytest.raises(ValueError, match="only normal images"):
        plan_prompts("p.pt", True, 0, ready=True, fitting=True, datamodule=normal_only)


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


@pytest.mark.parametrize(
    ("argument", "valid"),
    [
        ("dpam_kind", "Literal['vv', 'qq', 'kk', 'none']"),
        ("few_shot_fusion", "Literal['mean', 'harmonic', 'few_shot']"),
        ("loss", "Literal['glocal', 'global', 'local']"),
    ],
)
def test_the_cli_rejects_a_bad_choice_listing_the_valid_ones(
    argument: str, valid: str, capsys: pytest.CaptureFixture
) -> None:
    from anomalib.cli import AnomalibCLI

    with pytest.raises(SystemExit) as exit_info:
        AnomalibCLI(["test", "--model", "AnomalyCLIP", f"--model.{argument}", "xx", "--data", "MVTecAD"], run=False)
    output = capsys.readouterr()
    message = output.out + output.err
    assert exit_info.value.code != 0
    assert f'Parser key "{argument}"' in message or argument in message
    assert valid in message and "Got value: xx" in message


def test_python_callers_get_the_valid_choices_too(tiny_clip_path: Path) -> None:
    from anomalib_anomalyclip.errors import ChoiceError

    with pytest.raises(ChoiceError, match=r"dpam.kind must be one of 'vv', 'qq', 'kk', 'none', got 'xx'"):
        _model(tiny_clip_path, dpam_kind="xx")

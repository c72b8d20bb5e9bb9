"""Loading CLIP weights: OpenAI files, open_clip checkpoints, and offline errors."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch

from anomalib_anomalyclip.method.backbone import WeightsUnavailableError, load_clip
from anomalib_anomalyclip.testing.tiny_clip import (
    TinyClipConfig,
    build_tiny_clip,
    save_open_clip_checkpoint,
    save_openai_jit_archive,
    save_openai_state_dict,
)


def _assert_same_weights(model: torch.nn.Module, expected: torch.nn.Module) -> None:
    loaded = model.state_dict()
    for name, tensor in expected.state_dict().items():
        torch.testing.assert_close(loaded[name], tensor.float(), msg=name)


def _assert_frozen_quick_gelu_fp32(model: torch.nn.Module) -> None:
    assert not any(parameter.requires_grad for parameter in model.parameters())
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())
    assert not model.training
    assert isinstance(model.visual.transformer.resblocks[0].mlp.gelu, open_clip.model.QuickGELU)


def test_openai_state_dict_architecture_is_read_from_the_tensors(tiny_clip_path: Path) -> None:
    model = load_clip("ViT-L-14-336", tiny_clip_path)
    assert len(model.visual.transformer.resblocks) == 24
    assert model.visual.conv1.out_channels == 64
    assert model.visual.conv1.kernel_size == (14, 14)
    assert model.visual.positional_embedding.shape == (24 * 24 + 1, 64)
    _assert_frozen_quick_gelu_fp32(model)
    _assert_same_weights(model, build_tiny_clip(TinyClipConfig(), seed=0))


def test_any_width_and_depth_load(tmp_path: Path) -> None:
    config = TinyClipConfig(vision_width=128, vision_layers=7, text_layers=3, embed_dim=16)
    path = save_openai_state_dict(tmp_path / "other.pt", config, seed=3)
    model = load_clip("ViT-L-14-336", path)
    assert len(model.visual.transformer.resblocks) == 7
    assert model.visual.transformer.resblocks[0].attn.num_heads == 2
    assert len(model.transformer.resblocks) == 3
    _assert_same_weights(model, build_tiny_clip(config, seed=3))


@pytest.mark.slow  # tens of seconds to minutes of CPU: the full suite runs it
def test_openai_torchscript_archive_loads(tmp_path: Path) -> None:
    path = save_openai_jit_archive(tmp_path / "ViT-tiny.pt", seed=1, half_precision=True)
    model = load_clip("ViT-L-14-336", path)
    _assert_frozen_quick_gelu_fp32(model)
    expected = build_tiny_clip(TinyClipConfig(), seed=1)
    weight = model.visual.transformer.resblocks[3].attn.in_proj_weight
    torch.testing.assert_close(weight, expected.visual.transformer.resblocks[3].attn.in_proj_weight.half().float())


def test_open_clip_training_checkpoint_uses_the_named_architecture(tmp_path: Path) -> None:
    config = TinyClipConfig()
    model_config = {
        "embed_dim": config.embed_dim,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 336, "layers": 24, "width": 64, "patch_size": 14, "head_width": 64},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 12},
    }
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    (config_dir / "TinyCLIP-anomalyclip-test.json").write_text(json.dumps(model_config))
    open_clip.add_model_config(config_dir)
    path = save_open_clip_checkpoint(tmp_path / "epoch_1.pt", config, seed=2)
    model = load_clip("TinyCLIP-anomalyclip-test", path)
    _assert_frozen_quick_gelu_fp32(model)
    _assert_same_weights(model, build_tiny_clip(config, seed=2))


def test_missing_file_names_the_file_and_the_fix(tmp_path: Path) -> None:
    absent = tmp_path / "ViT-L-14-336px.pt"
    with pytest.raises(WeightsUnavailableError, match="does not exist") as error:
        load_clip("ViT-L-14-336", absent)
    assert str(absent) in str(error.value)
    assert "--model.pretrained" in str(error.value)


def test_unreadable_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "broken.pt"
    path.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(ValueError, match="Cannot read CLIP weights"):
        load_clip("ViT-L-14-336", path)


def test_tag_not_cached_offline_says_which_file_and_how_to_pass_it() -> None:
    # HF_HUB_OFFLINE=1 and an empty cache are set by conftest: nothing is downloaded.
    with pytest.raises(WeightsUnavailableError) as error:
        load_clip("ViT-L-14-336", "openai")  # offline-ok
    message = str(error.value)
    assert "ViT-L-14-336px.pt" in message
    assert f"--model.pretrained {Path.cwd() / 'ViT-L-14-336px.pt'}" in message  # where to copy it, and the option


def test_unknown_tag_and_model_are_rejected() -> None:
    with pytest.raises(ValueError, match="no pretrained tag 'nonsense'"):
        load_clip("ViT-L-14-336", "nonsense")
    with pytest.raises(ValueError, match="Unknown open_clip model"):
        load_clip("ViT-Nonexistent", "openai")  # offline-ok

"""Tests of the tiny CLIP checkpoint writers."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.model import CLIP, build_model_from_openai_state_dict

from anomalib_anomalyclip.testing.tiny_clip import (
    TinyClipConfig,
    build_tiny_clip,
    main,
    save_open_clip_checkpoint,
    save_openai_jit_archive,
    save_openai_state_dict,
)

METADATA_KEYS = {"input_resolution", "context_length", "vocab_size"}


def _jit_load(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated", category=FutureWarning)
        return torch.jit.load(str(path), map_location="cpu")


def _assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(actual) == set(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype, key
        assert torch.equal(actual[key], tensor), key


@pytest.fixture(scope="module")
def reference_state_dict(tiny_clip_config: TinyClipConfig) -> dict[str, torch.Tensor]:
    return build_tiny_clip(tiny_clip_config, seed=0).state_dict()


@pytest.fixture(scope="module")
def jit_archive_path(tmp_path_factory: pytest.TempPathFactory, tiny_clip_config: TinyClipConfig) -> Path:
    return save_openai_jit_archive(tmp_path_factory.mktemp("jit") / "tiny_clip_jit.pt", tiny_clip_config, seed=0)


# --------------------------------------------------------------------------------------------------
# Configuration and model
# --------------------------------------------------------------------------------------------------


def test_default_config_mirrors_vit_l_14_336_layout(tiny_clip_config: TinyClipConfig) -> None:
    assert tiny_clip_config.vision_layers == 24
    assert tiny_clip_config.vision_patch_size == 14
    assert tiny_clip_config.image_resolution == 336
    assert tiny_clip_config.grid_size == 24
    assert tiny_clip_config.context_length == 77
    assert tiny_clip_config.vocab_size == 49408
    assert tiny_clip_config.vision_heads == tiny_clip_config.vision_width // 64
    assert tiny_clip_config.text_heads == tiny_clip_config.text_width // 64


def test_config_is_frozen(tiny_clip_config: TinyClipConfig) -> None:
    with pytest.raises(AttributeError):
        tiny_clip_config.vision_width = 128  # type: ignore[misc]


@pytest.mark.parametrize(
    "overrides",
    [{"vision_width": 96}, {"text_width": 32}, {"image_resolution": 330}, {"vision_layers": 0}, {"embed_dim": 1.5}],
)
def test_config_rejects_invalid_values(overrides: dict) -> None:
    with pytest.raises(ValueError):
        TinyClipConfig(**overrides)


def test_build_tiny_clip_architecture(tiny_clip_config: TinyClipConfig) -> None:
    model = build_tiny_clip(tiny_clip_config)
    assert isinstance(model, CLIP)
    assert not model.training
    assert len(model.visual.transformer.resblocks) == 24
    assert len(model.transformer.resblocks) == 12
    assert model.visual.conv1.weight.shape == (64, 3, 14, 14)
    assert model.visual.positional_embedding.shape == (24 * 24 + 1, 64)
    assert model.visual.proj.shape == (64, 32)
    assert model.token_embedding.weight.shape == (49408, 64)
    assert model.positional_embedding.shape == (77, 64)
    assert model.text_projection.shape == (64, 32)
    assert model.visual.transformer.resblocks[0].attn.num_heads == 1
    assert model.transformer.resblocks[0].attn.num_heads == 1
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_build_tiny_clip_forward_shapes(tiny_clip_config: TinyClipConfig) -> None:
    model = build_tiny_clip(tiny_clip_config)
    image = torch.randn(2, 3, 336, 336)
    text = open_clip.tokenize(["a photo of a damaged object", "a photo of a flawless object"])
    with torch.no_grad():
        image_features, text_features, logit_scale = model(image, text)
    assert image_features.shape == (2, 32)
    assert text_features.shape == (2, 32)
    assert torch.isfinite(image_features).all()
    assert torch.isfinite(text_features).all()
    assert logit_scale.ndim == 0


def test_every_parameter_is_perturbed(tiny_clip_config: TinyClipConfig) -> None:
    model = build_tiny_clip(tiny_clip_config)
    for name, parameter in model.named_parameters():
        if parameter.numel() > 1:
            assert parameter.std() > 1e-3, f"{name} is (nearly) constant"
    # LayerNorm weights start at one and biases at zero in open_clip; all of them must have moved.
    for name, parameter in model.named_parameters():
        assert not torch.all(parameter == 0), name
        assert not torch.all(parameter == 1), name
    assert model.logit_scale.item() != pytest.approx(math.log(1 / 0.07), abs=1e-6)


def test_same_seed_gives_identical_tensors(tiny_clip_config: TinyClipConfig) -> None:
    first = build_tiny_clip(tiny_clip_config, seed=3).state_dict()
    second = build_tiny_clip(tiny_clip_config, seed=3).state_dict()
    _assert_same_tensors(first, second)


def test_different_seed_gives_different_tensors(tiny_clip_config: TinyClipConfig) -> None:
    first = build_tiny_clip(tiny_clip_config, seed=0).state_dict()
    second = build_tiny_clip(tiny_clip_config, seed=1).state_dict()
    assert set(first) == set(second)
    for key in first:
        assert not torch.equal(first[key], second[key]), key


def test_build_tiny_clip_leaves_global_rng_alone(tiny_clip_config: TinyClipConfig) -> None:
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    build_tiny_clip(tiny_clip_config, seed=0)
    assert torch.equal(torch.rand(4), expected)


# --------------------------------------------------------------------------------------------------
# OpenAI state dict
# --------------------------------------------------------------------------------------------------


def test_openai_state_dict_round_trip(
    tiny_clip_path: Path, reference_state_dict: dict[str, torch.Tensor], tiny_clip_config: TinyClipConfig
) -> None:
    loaded = torch.load(tiny_clip_path, map_location="cpu", weights_only=True)
    _assert_same_tensors(loaded, reference_state_dict)
    assert set(loaded) == set(build_tiny_clip(tiny_clip_config, seed=5).state_dict())
    assert tiny_clip_path.stat().st_size < 40 * 2**20


def test_openai_state_dict_has_openai_key_names(tiny_clip_path: Path) -> None:
    keys = set(torch.load(tiny_clip_path, map_location="cpu", weights_only=True))
    expected = {
        "visual.conv1.weight",
        "visual.class_embedding",
        "visual.positional_embedding",
        "visual.ln_pre.weight",
        "visual.transformer.resblocks.0.attn.in_proj_weight",
        "visual.transformer.resblocks.23.attn.in_proj_weight",
        "visual.transformer.resblocks.23.mlp.c_proj.bias",
        "visual.ln_post.bias",
        "visual.proj",
        "token_embedding.weight",
        "positional_embedding",
        "transformer.resblocks.11.attn.out_proj.weight",
        "ln_final.weight",
        "text_projection",
        "logit_scale",
    }
    assert expected <= keys
    assert "visual.transformer.resblocks.24.attn.in_proj_weight" not in keys
    assert "attn_mask" not in keys
    assert not METADATA_KEYS & keys


def test_open_clip_infers_architecture_from_openai_state_dict(
    tiny_clip_path: Path, reference_state_dict: dict[str, torch.Tensor]
) -> None:
    state_dict = torch.load(tiny_clip_path, map_location="cpu", weights_only=True)
    model = build_model_from_openai_state_dict(state_dict, cast_dtype=torch.float32)
    assert len(model.visual.transformer.resblocks) == 24
    assert model.visual.conv1.weight.shape[0] == 64
    assert model.visual.patch_size == (14, 14)
    assert model.visual.image_size == (336, 336)
    assert model.visual.grid_size == (24, 24)
    assert len(model.transformer.resblocks) == 12
    assert model.context_length == 77
    assert model.vocab_size == 49408
    assert model.text_projection.shape == (64, 32)
    # open_clip stores part of the weights in float16 (as OpenAI does), so compare loosely.
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor.float(), reference_state_dict[key], rtol=1e-3, atol=1e-3, msg=key)


def test_openai_state_dict_half_precision(tmp_path: Path, reference_state_dict: dict[str, torch.Tensor]) -> None:
    path = save_openai_state_dict(tmp_path / "half.pt", half_precision=True)
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    assert set(state_dict) == set(reference_state_dict)
    assert state_dict["visual.proj"].dtype == torch.float16
    assert state_dict["visual.conv1.weight"].dtype == torch.float16
    assert state_dict["visual.transformer.resblocks.0.attn.in_proj_weight"].dtype == torch.float16
    assert state_dict["text_projection"].dtype == torch.float16
    assert state_dict["ln_final.weight"].dtype == torch.float32
    for key, tensor in state_dict.items():
        assert torch.equal(tensor, reference_state_dict[key].to(tensor.dtype)), key
    model = build_model_from_openai_state_dict(state_dict)
    assert len(model.visual.transformer.resblocks) == 24


def _load_openai_model(path: Path) -> CLIP:
    # open_clip first tries torch.jit.load, which warns about its deprecation, on every file.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated", category=FutureWarning)
        return open_clip.load_openai_model(str(path), precision="fp32", device="cpu")


def test_load_openai_model_accepts_state_dict(tiny_clip_path: Path) -> None:
    model = _load_openai_model(tiny_clip_path)
    assert model.visual.image_size == (336, 336)
    assert next(model.parameters()).dtype == torch.float32


# --------------------------------------------------------------------------------------------------
# OpenAI TorchScript archive
# --------------------------------------------------------------------------------------------------


def test_jit_archive_state_dict_equals_original(
    jit_archive_path: Path, reference_state_dict: dict[str, torch.Tensor]
) -> None:
    state_dict = _jit_load(jit_archive_path).state_dict()
    assert set(state_dict) == set(reference_state_dict) | METADATA_KEYS
    _assert_same_tensors({k: v for k, v in state_dict.items() if k not in METADATA_KEYS}, reference_state_dict)


def test_jit_archive_metadata(jit_archive_path: Path) -> None:
    archive = _jit_load(jit_archive_path)
    state_dict = archive.state_dict()
    assert state_dict["input_resolution"].item() == 336
    assert state_dict["context_length"].item() == 77
    assert state_dict["vocab_size"].item() == 49408
    assert archive.input_resolution.item() == 336


@pytest.mark.slow  # tens of seconds to minutes of CPU: the full suite runs it
def test_jit_archive_traced_methods_match_eager_model(jit_archive_path: Path, tiny_clip_config: TinyClipConfig) -> None:
    archive = _jit_load(jit_archive_path)
    model = build_tiny_clip(tiny_clip_config, seed=0)
    torch.manual_seed(0)
    image = torch.randn(2, 3, 336, 336)
    text = open_clip.tokenize(["a photo of a scratched metal nut", "a photo of a metal nut"])
    with torch.no_grad():
        torch.testing.assert_close(archive.encode_image(image), model.encode_image(image))
        torch.testing.assert_close(archive.encode_text(text), model.encode_text(text))
        traced_image, traced_text, traced_scale = archive(image, text)
        eager_image, eager_text, eager_scale = model(image, text)
    torch.testing.assert_close(traced_image, eager_image)
    torch.testing.assert_close(traced_text, eager_text)
    torch.testing.assert_close(traced_scale, eager_scale)


def test_open_clip_builds_model_from_jit_archive(
    jit_archive_path: Path, reference_state_dict: dict[str, torch.Tensor]
) -> None:
    state_dict = dict(_jit_load(jit_archive_path).state_dict())
    model = build_model_from_openai_state_dict(state_dict)
    assert len(model.visual.transformer.resblocks) == 24
    assert model.visual.image_size == (336, 336)

    loaded = _load_openai_model(jit_archive_path)
    for key, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, reference_state_dict[key], rtol=1e-3, atol=1e-3, msg=key)


def test_jit_archive_half_precision(tmp_path: Path) -> None:
    # A shallow configuration: tracing in float16 on the CPU is slow.
    config = TinyClipConfig(vision_layers=2, text_layers=1, image_resolution=56)
    path = save_openai_jit_archive(tmp_path / "half_jit.pt", config, seed=4, half_precision=True)
    reference = build_tiny_clip(config, seed=4).state_dict()
    archive = _jit_load(path)
    state_dict = archive.state_dict()
    assert set(state_dict) == set(reference) | METADATA_KEYS
    assert state_dict["input_resolution"].item() == 56
    assert state_dict["visual.proj"].dtype == torch.float16
    assert state_dict["visual.ln_post.weight"].dtype == torch.float32
    for key, tensor in reference.items():
        assert torch.equal(state_dict[key], tensor.to(state_dict[key].dtype)), key
    model = build_model_from_openai_state_dict(dict(state_dict))
    assert len(model.visual.transformer.resblocks) == 2


# --------------------------------------------------------------------------------------------------
# open_clip training checkpoint
# --------------------------------------------------------------------------------------------------


def test_open_clip_checkpoint_round_trip(tmp_path: Path, reference_state_dict: dict[str, torch.Tensor]) -> None:
    path = save_open_clip_checkpoint(tmp_path / "nested" / "epoch_1.pt")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert set(checkpoint) == {"epoch", "name", "state_dict"}
    assert checkpoint["epoch"] == 1
    assert checkpoint["name"] == "tiny"
    assert all(key.startswith("module.") for key in checkpoint["state_dict"])
    _assert_same_tensors(
        {key.removeprefix("module."): value for key, value in checkpoint["state_dict"].items()}, reference_state_dict
    )


def test_load_openai_model_accepts_open_clip_checkpoint(tmp_path: Path) -> None:
    path = save_open_clip_checkpoint(tmp_path / "epoch_1.pt", seed=2)
    model = _load_openai_model(path)
    assert len(model.visual.transformer.resblocks) == 24


# --------------------------------------------------------------------------------------------------
# Small configurations and command line
# --------------------------------------------------------------------------------------------------


def test_custom_config_round_trip(tmp_path: Path) -> None:
    config = TinyClipConfig(
        embed_dim=16, vision_layers=2, text_layers=1, image_resolution=56, context_length=16, vocab_size=100
    )
    path = save_openai_state_dict(tmp_path / "small.pt", config, seed=7)
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model_from_openai_state_dict(state_dict, cast_dtype=torch.float32)
    assert len(model.visual.transformer.resblocks) == 2
    assert model.visual.grid_size == (4, 4)
    assert model.context_length == 16
    assert model.vocab_size == 100


@pytest.mark.parametrize("fmt", ["openai", "open_clip"])
def test_command_line_writes_checkpoint(tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / f"{fmt}.pt"
    main([str(target), "--format", fmt, "--seed", "1"])
    assert target.is_file()
    assert capsys.readouterr().out.strip() == str(target)

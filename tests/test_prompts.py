"""Prompt layout, learnable text-encoder tokens and prompt checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anomalib_anomalyclip.method.backbone import load_clip
from anomalib_anomalyclip.method.prompts import (
    PromptCheckpointError,
    PromptConfig,
    PromptLearner,
    PromptTextEncoder,
    read_prompt_checkpoint,
    save_prompts,
)

SOS, EOS = 49406, 49407


@pytest.fixture(scope="module")
def clip(tiny_clip_path: Path) -> torch.nn.Module:
    return load_clip("ViT-L-14-336", tiny_clip_path)


def _config(clip: torch.nn.Module, **overrides) -> PromptConfig:
    return PromptConfig(width=clip.ln_final.weight.shape[0], **overrides)


def test_sentences_and_token_layout(clip) -> None:
    encoder = PromptTextEncoder(clip, _config(clip))
    assert encoder.sentences("bottle") == ("X X X X X X X X X X X X object.", "X X X X X X X X X X X X damaged object.")
    tokens = encoder.tokens("bottle")
    assert tokens.shape == (2, 77)
    assert tokens[:, 0].tolist() == [SOS, SOS]
    assert len(set(tokens[:, 1:13].flatten().tolist())) == 1  # twelve identical "x" placeholders
    assert tokens.argmax(dim=-1).tolist() == [15, 16]  # EOS after "object ." and "damaged object ."
    assert tokens[0, 15] == EOS


def test_object_aware_prompts_name_the_class(clip) -> None:
    encoder = PromptTextEncoder(clip, _config(clip, prompt_type="object_aware"))
    assert encoder.sentences("metal_nut")[1] == "X X X X X X X X X X X X damaged metal nut."
    learner = PromptLearner(encoder.config)
    with torch.no_grad():
        features = encoder(learner, ["bottle", "metal_nut"])
    assert features.shape == (2, 2, clip.text_projection.shape[1])
    assert not torch.allclose(features[0], features[1])


def test_object_agnostic_prompts_ignore_the_class(clip) -> None:
    encoder = PromptTextEncoder(clip, _config(clip))
    learner = PromptLearner(encoder.config)
    with torch.no_grad():
        features = encoder(learner, ["bottle", "metal_nut"])
    torch.testing.assert_close(features[0], features[1])
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(2, 2))


def _block_inputs(encoder: PromptTextEncoder, learner: PromptLearner) -> list[torch.Tensor]:
    inputs: list[torch.Tensor] = []
    hooks = [
        block.register_forward_pre_hook(
            lambda _module, args, _kwargs: inputs.append(args[0].detach()), with_kwargs=True
        )
        for block in encoder.transformer.resblocks
    ]
    try:
        with torch.no_grad():
            encoder(learner)
    finally:
        for hook in hooks:
            hook.remove()
    return inputs


def test_context_vectors_fill_positions_1_to_n_ctx(clip) -> None:
    encoder = PromptTextEncoder(clip, _config(clip))
    learner = PromptLearner(encoder.config)
    first = _block_inputs(encoder, learner)[0]
    positions = encoder.positional_embedding[1:13]
    torch.testing.assert_close(first[0, 1:13], learner.normal_context + positions)
    torch.testing.assert_close(first[1, 1:13], learner.abnormal_context + positions)
    embedded = encoder.token_embedding(encoder.tokens("object")) + encoder.positional_embedding
    torch.testing.assert_close(first[:, 13:], embedded[:, 13:])


def test_text_tokens_replace_positions_1_to_4_of_blocks_2_to_9(clip) -> None:
    encoder = PromptTextEncoder(clip, _config(clip))
    learner = PromptLearner(encoder.config)
    assert len(learner.text_tokens) == 8
    inputs = _block_inputs(encoder, learner)
    for block in range(1, 9):  # 0-indexed blocks 1..8 are blocks 2..9
        token = learner.text_tokens[block - 1].half().float()
        torch.testing.assert_close(inputs[block][:, 1:5], token.expand(2, -1, -1), atol=0, rtol=0)
        assert not torch.allclose(inputs[block][:, 5:13], token[:1].expand(2, 8, -1))
    for block in range(9, 12):
        assert not torch.allclose(inputs[block][:, 1:5], learner.text_tokens[-1].expand(2, -1, -1), atol=1e-3)


def test_text_tokens_can_be_switched_off(clip) -> None:
    config = _config(clip, text_tokens=False)
    encoder = PromptTextEncoder(clip, config)
    learner = PromptLearner(config)
    assert len(learner.text_tokens) == 0
    inputs = _block_inputs(encoder, learner)
    torch.testing.assert_close(
        inputs[0][:, 1:13],
        torch.stack([learner.normal_context, learner.abnormal_context]) + encoder.positional_embedding[1:13],
    )


def test_prompts_receive_gradients(clip) -> None:
    encoder = PromptTextEncoder(clip, _config(clip))
    learner = PromptLearner(encoder.config)
    encoder(learner)[0, 1].sum().backward()
    assert learner.normal_context.grad is not None and learner.abnormal_context.grad.abs().sum() > 0
    assert all(token.grad is not None for token in learner.text_tokens)
    assert all(parameter.grad is None for parameter in clip.parameters())


def test_our_checkpoint_round_trips(clip, tmp_path: Path) -> None:
    learner = PromptLearner(_config(clip))
    path = save_prompts(learner, tmp_path / "prompts.pt")
    other = PromptLearner(_config(clip))
    other.load_checkpoint(path)
    for name, tensor in learner.state_dict().items():
        assert torch.equal(other.state_dict()[name], tensor)


def _reference_checkpoint(path: Path, width: int, n_ctx: int = 12, depth: int = 9, length: int = 4) -> dict:
    generator = torch.Generator().manual_seed(7)
    state = {
        "ctx_pos": torch.randn(1, 1, n_ctx, width, generator=generator),
        "ctx_neg": torch.randn(1, 1, n_ctx, width, generator=generator),
        "token_prefix_pos": torch.randn(1, 1, 1, width),
        "token_suffix_pos": torch.randn(1, 1, 64, width),
        "tokenized_prompts_pos": torch.zeros(1, 1, 77, dtype=torch.long),
    }
    for index in range(depth - 1):
        state[f"compound_prompts_text.{index}"] = torch.randn(length, width, generator=generator)
        state[f"compound_prompt_projections.{index}.weight"] = torch.randn(896, width)
        state[f"compound_prompt_projections.{index}.bias"] = torch.randn(896)
    torch.save({"prompt_learner": state}, path)
    return state


def test_reference_release_format_loads(clip, tmp_path: Path) -> None:
    config = _config(clip)
    state = _reference_checkpoint(tmp_path / "epoch_15.pth", config.width)
    learner = PromptLearner(config)
    learner.load_checkpoint(tmp_path / "epoch_15.pth")
    assert torch.equal(learner.normal_context, state["ctx_pos"][0, 0])
    assert torch.equal(learner.abnormal_context, state["ctx_neg"][0, 0])
    for index in range(8):
        assert torch.equal(learner.text_tokens[index], state[f"compound_prompts_text.{index}"])


@pytest.mark.parametrize(
    ("checkpoint", "message"),
    [
        ({"n_ctx": 8}, "n_ctx=8"),
        ({"width": 768}, "text width of 768"),
        ({"depth": 7}, "text_token_depth=7"),
        ({"length": 2}, "text_token_length=4"),
    ],
)
def test_checkpoint_of_another_configuration_names_the_mismatch(
    clip, tmp_path: Path, checkpoint: dict, message: str
) -> None:
    config = _config(clip)
    _reference_checkpoint(tmp_path / "other.pth", checkpoint.pop("width", config.width), **checkpoint)
    with pytest.raises(PromptCheckpointError, match=message):
        PromptLearner(config).load_checkpoint(tmp_path / "other.pth")


def test_missing_or_foreign_checkpoint_files_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(PromptCheckpointError, match="does not exist"):
        read_prompt_checkpoint(tmp_path / "absent.pth")
    torch.save({"something": torch.zeros(1)}, tmp_path / "foreign.pth")
    with pytest.raises(PromptCheckpointError, match="not a prompt checkpoint"):
        read_prompt_checkpoint(tmp_path / "foreign.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a torch file")
    with pytest.raises(PromptCheckpointError, match="Cannot read"):
        read_prompt_checkpoint(tmp_path / "garbage.pth")

"""The dual-path visual forward against a naive, step-by-step computation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from anomalib_anomalyclip.method.backbone import load_clip
from anomalib_anomalyclip.method.dpam import DualPathVisualEncoder


@pytest.fixture(scope="module")
def visual(tiny_clip_path: Path) -> torch.nn.Module:
    return load_clip("ViT-L-14-336", tiny_clip_path).visual


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))


def _naive_attention(block: torch.nn.Module, x: torch.Tensor, similarity: str) -> torch.Tensor:
    """Multi-head attention written out head by head; ``similarity`` picks the score pair."""
    attn = block.attn
    q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    pick = {"q": q, "k": k, "v": v}
    left, right = pick[similarity[0]], pick[similarity[1]]
    heads = attn.num_heads
    head_dim = x.shape[-1] // heads
    outputs = []
    for head in range(heads):
        part = slice(head * head_dim, (head + 1) * head_dim)
        scores = left[..., part] @ right[..., part].transpose(-1, -2) * head_dim**-0.5
        outputs.append(scores.softmax(dim=-1) @ v[..., part])
    return attn.out_proj(torch.cat(outputs, dim=-1))


def _naive_forward(visual: torch.nn.Module, images: torch.Tensor, kind: str, start: int, layers: tuple[int, ...]):
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    grid = round(x.shape[1] ** 0.5)
    table = visual.positional_embedding
    side = round((table.shape[0] - 1) ** 0.5)
    patch_table = F.interpolate(
        table[1:].T.reshape(1, -1, side, side), size=(grid, grid), mode="bilinear", align_corners=False
    )
    positions = torch.cat([table[:1], patch_table.reshape(table.shape[1], -1).T])
    x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + positions
    x = visual.ln_pre(x)
    x_dpam = None
    taps = []
    for index, block in enumerate(visual.transformer.resblocks, start=1):
        dual = kind != "none" and index >= start
        if dual:
            x_dpam = x if x_dpam is None else x_dpam
            x_dpam = x_dpam + _naive_attention(block, x, kind)
        x = x + _naive_attention(block, x, "qk")
        x = x + block.mlp(block.ln_2(x))
        if index in layers:
            taps.append(visual.ln_post((x_dpam if dual else x)[:, 1:]) @ visual.proj)
    return x[:, 0] @ visual.proj, taps


@pytest.mark.parametrize("kind", ["vv", "qq", "kk", "none"])
def test_dual_path_equals_naive_computation(visual, images, kind: str) -> None:
    layers = (3, 6, 12, 18, 24)
    encoder = DualPathVisualEncoder(visual, kind, dpam_start_layer=6, feature_layers=layers)
    with torch.no_grad():
        global_embedding, taps = encoder(images)
        expected_global, expected_taps = _naive_forward(visual, images, kind, 6, layers)
    torch.testing.assert_close(global_embedding, expected_global, atol=1e-5, rtol=1e-4)
    assert len(taps) == len(layers)
    for tap, expected in zip(taps, expected_taps, strict=True):
        assert tap.shape == (2, 16, visual.proj.shape[1])
        torch.testing.assert_close(tap, expected, atol=1e-5, rtol=1e-4)


def test_none_equals_plain_open_clip_tokens(visual, images) -> None:
    encoder = DualPathVisualEncoder(visual, "none", feature_layers=(12, 24))
    size = visual.positional_embedding.shape[0]
    grid = round((size - 1) ** 0.5)
    native = torch.randn(1, 3, grid * 14, grid * 14)
    with torch.no_grad():
        _, taps = encoder(native)
        x = visual.ln_pre(
            torch.cat([visual.class_embedding.view(1, 1, -1), visual.conv1(native).flatten(2).transpose(1, 2)], 1)
            + visual.positional_embedding
        )
        blocks = []
        for block in visual.transformer.resblocks:
            x = block(x)
            blocks.append(x)
    for tap, layer in zip(taps, (12, 24), strict=True):
        torch.testing.assert_close(tap, visual.ln_post(blocks[layer - 1][:, 1:]) @ visual.proj, atol=1e-5, rtol=1e-4)


def test_global_embedding_does_not_depend_on_the_dpam_kind(visual, images) -> None:
    with torch.no_grad():
        globals_ = [DualPathVisualEncoder(visual, kind)(images)[0] for kind in ("vv", "qq", "kk", "none")]
    for other in globals_[1:]:
        torch.testing.assert_close(other, globals_[0], atol=1e-5, rtol=1e-4)


def test_dpam_kinds_give_different_patch_tokens(visual, images) -> None:
    with torch.no_grad():
        tokens = {kind: DualPathVisualEncoder(visual, kind)(images)[1][0] for kind in ("vv", "qq", "kk", "none")}
    kinds = list(tokens)
    for i, first in enumerate(kinds):
        for second in kinds[i + 1 :]:
            assert not torch.allclose(tokens[first], tokens[second], atol=1e-4), (first, second)


def test_layers_before_the_dpam_start_are_plain_clip(visual, images) -> None:
    with torch.no_grad():
        dpam = DualPathVisualEncoder(visual, "vv", dpam_start_layer=10, feature_layers=(9,))(images)[1][0]
        plain = DualPathVisualEncoder(visual, "none", feature_layers=(9,))(images)[1][0]
    torch.testing.assert_close(dpam, plain)


def test_resizing_positions_does_not_touch_the_weights(visual) -> None:
    encoder = DualPathVisualEncoder(visual)
    before = visual.positional_embedding.detach().clone()
    small = torch.randn(1, 3, 42, 42, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        first = encoder(small)
        encoder(torch.randn(1, 3, 70, 70))
        again = encoder(small)
    assert torch.equal(visual.positional_embedding, before)
    torch.testing.assert_close(again[0], first[0])
    torch.testing.assert_close(again[1][0], first[1][0])


def test_non_square_inputs_give_a_rectangular_grid(visual) -> None:
    encoder = DualPathVisualEncoder(visual)
    with torch.no_grad():
        _, taps = encoder(torch.randn(1, 3, 42, 70))
    assert encoder.grid_size((42, 70)) == (3, 5)
    assert taps[0].shape[1] == 15


@pytest.mark.parametrize(
    ("arguments", "message"),
    [({"feature_layers": (0, 24)}, r"dpam\.feature_layers"), ({"dpam_start_layer": 25}, r"dpam\.start_layer")],
)
def test_layer_numbers_outside_the_transformer_are_rejected(visual, arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DualPathVisualEncoder(visual, **arguments)

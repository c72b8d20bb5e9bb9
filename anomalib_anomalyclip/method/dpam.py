"""The dual-path visual forward of AnomalyCLIP (DPAM: diagonally prominent attention maps).

From block ``dpam_start_layer`` (1-indexed) on, every block runs two residual streams:

* the original stream ``x_ori``: ordinary CLIP attention and MLP, which yields the
  global image embedding (CLS token after the last block);
* the DPAM stream ``x_dpam``: attention whose similarity is V-V (or Q-Q, K-K) instead
  of Q-K, and no MLP. Both paths compute q, k and v from ``ln_1(x_ori)``; the DPAM
  stream only accumulates its attention outputs. The patch tokens for the anomaly maps
  are read from this stream after the blocks listed in ``feature_layers``.

Patch tokens can also be read ("tapped") from the original stream of any block, in the
same forward (the few-shot memory bank may use them, see :mod:`.few_shot`). Work the
outputs do not need is skipped: the DPAM stream stops after its last tap, and in the last
block the original stream only computes the CLS token unless that block is tapped there.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

DpamKindName = Literal["vv", "qq", "kk", "none"]
TokenPathName = Literal["dpam", "original"]


class DpamKind(str, Enum):
    """Which similarity the DPAM path uses; ``NONE`` is plain CLIP attention."""

    VV = "vv"
    QQ = "qq"
    KK = "kk"
    NONE = "none"


class TokenPath(str, Enum):
    """Which residual stream patch tokens are read from."""

    DPAM = "dpam"  # the DPAM stream (the ordinary stream in blocks without the dual path)
    ORIGINAL = "original"  # the ordinary CLIP stream
    RESIDUAL = "residual"  # the ordinary stream's raw tokens: no ln_post, no projection (mutual scoring's tokens)


class Tap(NamedTuple):
    """Where to read patch tokens: after block ``layer`` (1-indexed), from stream ``path``."""

    layer: int
    path: TokenPath


class VisualFeatures(NamedTuple):
    """What one encoder pass over a batch gives (:meth:`DualPathVisualEncoder.encode`): every caller's one encoding.

    Attributes:
        global_embedding: (B, D) global embeddings (the prompts' image score).
        patch_tokens: per feature layer, (B, N, D) DPAM patch tokens (the zero-shot maps).
        extra_tokens: per extra tap, in the order asked for, (B, N, D) patch tokens (a few-shot bank's, mutual
            scoring's).
        class_embedding: (B, D) CLIP's own image embedding when asked for, else ``None``.
    """

    global_embedding: torch.Tensor
    patch_tokens: list[torch.Tensor]
    extra_tokens: list[torch.Tensor]
    class_embedding: torch.Tensor | None = None

    @staticmethod
    def cat(parts: Sequence[VisualFeatures]) -> VisualFeatures:
        """The features of several batches as one batch (in order)."""
        first = parts[0]

        def joined(layers: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
            return [torch.cat(layer) for layer in zip(*layers, strict=True)]

        return VisualFeatures(
            torch.cat([part.global_embedding for part in parts]),
            joined([part.patch_tokens for part in parts]),
            joined([part.extra_tokens for part in parts]),
            None if first.class_embedding is None else torch.cat([part.class_embedding for part in parts]),
        )

    def select(self, rows: slice) -> VisualFeatures:
        """The features of the batch rows ``rows``."""
        return VisualFeatures(
            self.global_embedding[rows],
            [layer[rows] for layer in self.patch_tokens],
            [layer[rows] for layer in self.extra_tokens],
            None if self.class_embedding is None else self.class_embedding[rows],
        )


def check_layers(layers: Sequence[int], depth: int, name: str) -> tuple[int, ...]:
    """Sorted unique layer numbers; ``ValueError`` naming the argument when one lies outside 1..depth."""
    layers = tuple(sorted(set(layers)))
    bad = [layer for layer in layers if not 1 <= layer <= depth]
    if bad:
        raise ValueError(f"{name} {bad} outside the visual transformer's blocks 1..{depth}.")
    return layers


class DualPathVisualEncoder(nn.Module):
    """CLIP vision transformer with AnomalyCLIP's DPAM path and patch-token taps.

    Args:
        visual: an open_clip ``VisionTransformer`` (frozen; its weights are used as they are).
        dpam_kind: similarity of the DPAM path (``vv``, ``qq``, ``kk``) or ``none``.
        dpam_start_layer: first block (1-indexed) that runs the dual path. The reference's
            ``DPAM_layer=20`` on 24 blocks means 6.
        feature_layers: blocks (1-indexed) whose patch tokens feed the anomaly maps.
            ``None`` means the last block only, as in the released code.

    Raises:
        ValueError: a layer number lies outside the transformer.
    """

    def __init__(
        self,
        visual: nn.Module,
        dpam_kind: DpamKind | str = DpamKind.VV,
        dpam_start_layer: int = 6,
        feature_layers: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.visual = visual
        self.dpam_kind = DpamKind(dpam_kind)
        depth = len(visual.transformer.resblocks)
        self.depth = depth
        self.feature_layers = check_layers(feature_layers, depth, "dpam.feature_layers") if feature_layers else (depth,)
        if not 1 <= dpam_start_layer <= depth:
            raise ValueError(f"dpam.start_layer {dpam_start_layer} outside the visual transformer's blocks 1..{depth}.")
        self.dpam_start_layer = dpam_start_layer
        self.num_heads = visual.transformer.resblocks[0].attn.num_heads
        self.patch_size = _pair(visual.conv1.kernel_size)

    def grid_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Patch grid (rows, columns) for an input of ``image_size`` (height, width)."""
        return image_size[0] // self.patch_size[0], image_size[1] // self.patch_size[1]

    @property
    def output_dim(self) -> int:
        """Size D of the global embedding and of the projected patch tokens."""
        proj = self.visual.proj
        return int(self.visual.class_embedding.shape[-1] if proj is None else proj.shape[1])

    @property
    def feature_taps(self) -> tuple[Tap, ...]:
        """The taps that make the zero-shot anomaly maps: the DPAM stream of the feature layers."""
        return tuple(Tap(layer, TokenPath.DPAM) for layer in self.feature_layers)

    def encode(
        self, images: torch.Tensor, extra_taps: Sequence[Tap] = (), class_embedding: bool = False
    ) -> VisualFeatures:
        """One pass over CLIP-normalised ``images`` (B, 3, H, W): the feature layers' tokens and ``extra_taps``'."""
        outputs = self(images, self.feature_taps + tuple(extra_taps), class_embedding=class_embedding)
        layers = len(self.feature_taps)
        tokens = outputs[1]
        return VisualFeatures(outputs[0], tokens[:layers], tokens[layers:], outputs[2] if class_embedding else None)

    def forward(
        self, images: torch.Tensor, taps: Sequence[Tap] | None = None, class_embedding: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]] | tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Encode a normalised image batch.

        Args:
            images: (B, 3, H, W) images, CLIP-normalised.
            taps: where to read patch tokens (a tap may appear more than once); ``None``:
                :attr:`feature_taps`, the tokens of the zero-shot maps.
            class_embedding: also return CLIP's own image embedding, ``ln_post(CLS) @ proj``.

        Returns:
            The global embedding (B, D) and, per tap in the given order, the patch tokens
            (B, N, D) without the CLS token, N = rows * columns of the patch grid: projected,
            except for the ``residual`` path (B, N, width). With ``class_embedding``, a third
            item: CLIP's image embedding (B, D).
        """
        taps = self.feature_taps if taps is None else taps
        taps = [Tap(int(layer), TokenPath(path)) for layer, path in taps]
        check_layers([tap.layer for tap in taps], self.depth, "tapped layers")
        dpam_layers = [tap.layer for tap in taps if tap.path is TokenPath.DPAM or not self._dual(tap.layer)]
        last_dpam_tap = max(dpam_layers, default=0)
        ordinary_in_last = any(tap.layer == self.depth and tap.path is not TokenPath.DPAM for tap in taps) or (
            self.depth in dpam_layers and not self._dual(self.depth)
        )
        x = self._embed(images)
        x_dpam: torch.Tensor | None = None
        read: dict[Tap, torch.Tensor] = {}
        for index, block in enumerate(self.visual.transformer.resblocks, start=1):
            cls_only = index == self.depth and not ordinary_in_last
            if self._dual(index):
                x_dpam = x if x_dpam is None else x_dpam
                x, x_dpam = self._dual_block(block, x, x_dpam, keep_dpam=index <= last_dpam_tap, cls_only=cls_only)
                streams = {TokenPath.DPAM: x_dpam, TokenPath.ORIGINAL: x, TokenPath.RESIDUAL: x}
            else:
                x = self._plain_block(block, x, cls_only=cls_only)
                streams = {TokenPath.DPAM: x, TokenPath.ORIGINAL: x, TokenPath.RESIDUAL: x}
            for tap in taps:
                if tap.layer == index and tap not in read:
                    tokens = streams[tap.path][:, 1:]
                    read[tap] = tokens if tap.path is TokenPath.RESIDUAL else self._project(self.visual.ln_post(tokens))
        # The released code projects the CLS token without ln_post; the prompts were trained so.
        global_embedding = self._project(x[:, 0])
        if class_embedding:
            return global_embedding, [read[tap] for tap in taps], self._project(self.visual.ln_post(x[:, 0]))
        return global_embedding, [read[tap] for tap in taps]

    def _dual(self, index: int) -> bool:
        return self.dpam_kind is not DpamKind.NONE and index >= self.dpam_start_layer

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        visual = self.visual
        x = visual.conv1(images)
        rows, columns = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self._positional_embedding(rows, columns).to(x.dtype)
        return visual.ln_pre(x)

    def _positional_embedding(self, rows: int, columns: int) -> torch.Tensor:
        """The positional table for a rows x columns grid (bilinear, align_corners False).

        Computed per call rather than written back into the weights, so that inputs of
        different sizes never see an already-resized table.
        """
        table = self.visual.positional_embedding
        side = round((table.shape[0] - 1) ** 0.5)
        if (rows, columns) == (side, side):
            return table
        grid = table[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(rows, columns), mode="bilinear", align_corners=False)
        return torch.cat([table[:1], grid.flatten(2).squeeze(0).transpose(0, 1)], dim=0)

    def _project(self, tokens: torch.Tensor) -> torch.Tensor:
        proj = self.visual.proj
        return tokens if proj is None else tokens @ proj

    def _qkv(self, block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn = block.attn
        qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
        batch, length, _ = qkv.shape
        # One copy into (3, B, heads, L, head_dim): contiguous q, k, v make the fused attention faster on CPU.
        qkv = qkv.reshape(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).contiguous()
        return qkv[0], qkv[1], qkv[2]

    def _attend(self, block: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(query, key, value)
        batch, _, length, _ = out.shape
        out = out.transpose(1, 2).reshape(batch, length, -1)
        return block.ls_1(F.linear(out, block.attn.out_proj.weight, block.attn.out_proj.bias))

    def _attention_then_mlp(
        self, block: nn.Module, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cls_only: bool
    ) -> torch.Tensor:
        if cls_only:
            x, q = x[:, :1], q[:, :, :1]
        x = x + self._attend(block, q, k, v)
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    def _plain_block(self, block: nn.Module, x: torch.Tensor, cls_only: bool) -> torch.Tensor:
        q, k, v = self._qkv(block, x)
        return self._attention_then_mlp(block, x, q, k, v, cls_only)

    def _dual_block(
        self, block: nn.Module, x_ori: torch.Tensor, x_dpam: torch.Tensor, keep_dpam: bool, cls_only: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = self._qkv(block, x_ori)
        if keep_dpam:
            similar = {DpamKind.VV: v, DpamKind.QQ: q, DpamKind.KK: k}[self.dpam_kind]
            x_dpam = x_dpam + self._attend(block, similar, similar, v)
        return self._attention_then_mlp(block, x_ori, q, k, v, cls_only), x_dpam


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    return int(value[0]), int(value[1])

"""How one image's visual features are laid out in a cache row, and in which precision.

A row holds exactly what :class:`~anomalib_anomalyclip.method.dpam.DualPathVisualEncoder`
returns for one image: the global embedding (D) followed by each feature layer's patch
tokens (patches x D), flattened, so ``D * (1 + layers * patches)`` numbers per image.

Storage precision: float32 by default, so a read returns the features that the first
epoch computed, bit for bit. An uncached run instead recomputes them every epoch, in
batches of another composition, which may round differently in the last bit; that is the
only difference between cached and uncached training. On the tiny test CLIP the learned
prompts are identical after 15 epochs. Prompt training on random ViT-B-16 weights is so
sensitive to rounding (Adam turns near-zero gradients into full steps) that an uncached
run with 2 instead of 1 torch thread differs from the uncached run as much as the cached
run does (``benchmarks/train.py --rounding-floor``). float16 halves the size but rounds
every feature (relative error up to 2**-11): on the tiny CLIP the prompts after 15 epochs
then differ by up to 3e-5 (7e-4 of what training changed them by), more than the 1e-5
that cached training is meant to keep.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from anomalib_anomalyclip.method.dpam import DualPathVisualEncoder

__all__ = ["STORAGE_DTYPES", "FeatureLayout", "check_storage_dtype"]

STORAGE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class FeatureLayout:
    """How one image's visual features are laid out in a cache row.

    A row is the global embedding (D) followed by each feature layer's patch tokens
    (patches x D), flattened.

    Attributes:
        embed_dim: D, the size of the global embedding and of every patch token.
        num_layers: number of feature layers.
        num_patches: patch tokens per layer (rows x columns of the patch grid).
        dtype_name: storage precision, a key of :data:`STORAGE_DTYPES`.
    """

    embed_dim: int
    num_layers: int
    num_patches: int
    dtype_name: str = "float32"

    def __post_init__(self) -> None:
        check_storage_dtype(self.dtype_name)

    @classmethod
    def for_encoder(
        cls, encoder: DualPathVisualEncoder, image_size: Sequence[int], dtype_name: str = "float32"
    ) -> FeatureLayout:
        """The layout of ``encoder``'s outputs for inputs of ``image_size`` (height, width)."""
        rows, columns = encoder.grid_size(tuple(image_size))
        return cls(encoder.output_dim, len(encoder.feature_layers), rows * columns, dtype_name)

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype."""
        return STORAGE_DTYPES[self.dtype_name]

    @property
    def row_numel(self) -> int:
        """Numbers per image."""
        return self.embed_dim * (1 + self.num_layers * self.num_patches)

    @property
    def row_bytes(self) -> int:
        """Bytes per image."""
        return self.row_numel * self.dtype.itemsize

    def pack(self, global_embedding: torch.Tensor, patch_tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        """Rows (B, row_numel) from the encoder's outputs (B, D) and per layer (B, N, D)."""
        return torch.cat([global_embedding, *(tokens.flatten(1) for tokens in patch_tokens)], dim=1)

    def unpack(self, rows: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The encoder's outputs, the global embedding (B, D) and per layer (B, N, D), from rows."""
        patches = rows[:, self.embed_dim :].unflatten(1, (self.num_layers, self.num_patches, self.embed_dim))
        return rows[:, : self.embed_dim], [patches[:, layer] for layer in range(self.num_layers)]

    def describe(self, count: int) -> str:
        """Human-readable size of ``count`` rows, e.g. ``40 images x 4.2 MB (...) = 168.3 MB``."""
        layers = f"{self.num_layers} layer{'s' if self.num_layers != 1 else ''}"
        return (
            f"{count} images x {_size_text(self.row_bytes)} (global {self.embed_dim} + {layers} x "
            f"{self.num_patches} patches x {self.embed_dim}, {self.dtype_name}) = {_size_text(count * self.row_bytes)}"
        )


def check_storage_dtype(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is a storage precision of :data:`STORAGE_DTYPES`."""
    if name not in STORAGE_DTYPES:
        raise ValueError(f"feature_cache.dtype must be one of {sorted(STORAGE_DTYPES)}, got {name!r}.")


def _size_text(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"

"""Few-shot AnomalyCLIP: a memory bank of normal patch tokens beside the prompts.

With ``k`` normal reference images of the product, the bank keeps, for each tap ``t``
(a visual block and the stream its patch tokens are read from, see :class:`.dpam.Tap`),
the L2-normalised patch tokens ``b_{t,m}`` of all references (``k x N`` tokens per tap).
For a test image with patch tokens ``x_{t,p}``:

.. code-block:: text

    d_t(p) = min(1, min_m (1 - cos(x_{t,p}, b_{t,m})))      nearest normal token, per tap
    F      = smooth(upsample(mean_t d_t))                   few-shot map, in [0, 1]
    Z      = smooth(upsample(sum_l A_l)) / L                zero-shot map on its probability scale, in [0, 1]
    s      = P(abnormal | global embedding)                 zero-shot image score

Fusions, each defined on a single image (no statistics of a test set):

.. code-block:: text

    mean:      map = (Z + F) / 2            score = (s + max F) / 2
    harmonic:  map = 2 Z F / (Z + F)        score = 2 s max F / (s + max F)
    few_shot:  map = F                      score = max F

The nearest-neighbour search is one batched matrix product per tap (chunked over the
bank's rows for large banks), so it traces into exported graphs, where the bank is a
constant like the text embeddings.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from anomalib.data import InferenceBatch
from torch import nn

from anomalib_anomalyclip.errors import parse_choice
from anomalib_anomalyclip.method.dpam import Tap, TokenPath
from anomalib_anomalyclip.method.scoring import GaussianSmoothing

BANK_CHUNK_ROWS = 8192  # bank rows per matrix product: bounds the similarity matrix (B x N x rows)
_EPSILON = 1e-8


FewShotFusionName = Literal["mean", "harmonic", "few_shot"]


class FewShotFusion(str, Enum):
    """How the few-shot map joins the zero-shot map (see the module docstring)."""

    MEAN = "mean"
    HARMONIC = "harmonic"
    FEW_SHOT = "few_shot"


def nearest_distances(tokens: torch.Tensor, bank: torch.Tensor, chunk_rows: int = BANK_CHUNK_ROWS) -> torch.Tensor:
    """Cosine distance ``min(1, 1 - cos)`` of each token to its nearest bank row.

    Args:
        tokens: (B, N, D) patch tokens, not necessarily normalised.
        bank: (M, D) L2-normalised bank tokens.
        chunk_rows: bank rows per matrix product.

    Returns:
        (B, N) distances in [0, 1].
    """
    tokens = F.normalize(tokens, dim=-1)
    best: torch.Tensor | None = None
    for start in range(0, bank.shape[0], chunk_rows):
        similarity = (tokens @ bank[start : start + chunk_rows].transpose(0, 1)).amax(dim=-1)
        best = similarity if best is None else torch.maximum(best, similarity)
    if best is None:
        raise ValueError("The few-shot memory bank is empty.")
    return (1 - best).clamp(0, 1)


def fuse(
    zero_shot_score: torch.Tensor, zero_shot_map: torch.Tensor, few_shot_map: torch.Tensor, fusion: FewShotFusion
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image score (B,) and map (B, 1, H, W) from both maps, each on a [0, 1] scale (module docstring)."""
    few_shot_score = few_shot_map.flatten(1).amax(dim=1)
    if fusion is FewShotFusion.FEW_SHOT:
        return few_shot_score, few_shot_map
    if fusion is FewShotFusion.HARMONIC:
        return _harmonic(zero_shot_score, few_shot_score), _harmonic(zero_shot_map, few_shot_map)
    return (zero_shot_score + few_shot_score) / 2, (zero_shot_map + few_shot_map) / 2


def smoothed_outputs(
    zero_shot_score: torch.Tensor,
    zero_shot_map: torch.Tensor,
    few_shot_map: torch.Tensor | None,
    layers: int,
    smoothing: GaussianSmoothing,
    few_shot: FewShotScorer | None = None,
) -> InferenceBatch:
    """Score and smoothed map from the maps before smoothing: the zero-shot ones, or both fused by the bank's rule.

    Args:
        zero_shot_score: (B,) zero-shot image scores.
        zero_shot_map: (B, 1, H, W) summed layer maps, in [0, layers].
        few_shot_map: (B, 1, H, W) few-shot distance map, or ``None`` (zero-shot).
        layers: number of feature layers summed in ``zero_shot_map``.
        smoothing: the Gaussian smoothing.
        few_shot: the bank whose fusion applies (needed with ``few_shot_map``).
    """
    if few_shot_map is None or few_shot is None:
        return InferenceBatch(pred_score=zero_shot_score, anomaly_map=smoothing(zero_shot_map))
    batch = zero_shot_map.shape[0]
    # Both maps smoothed in one call; the zero-shot map on its probability scale [0, 1].
    smoothed = smoothing(torch.cat([zero_shot_map / layers, few_shot_map]))
    score, anomaly_map = fuse(zero_shot_score, smoothed[:batch], smoothed[batch:], few_shot.fusion)
    return InferenceBatch(pred_score=score, anomaly_map=anomaly_map)


def _harmonic(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    return 2 * first * second / (first + second + _EPSILON)


class FewShotScorer(nn.Module):
    """The memory bank of normal patch tokens and the few-shot map.

    Args:
        taps: where the bank's patch tokens are read, one bank per tap.
        fusion: how the few-shot map joins the zero-shot map.
        dim: size of the projected patch tokens.
    """

    def __init__(self, taps: Sequence[Tap], fusion: FewShotFusion | str, dim: int) -> None:
        super().__init__()
        if not taps:
            raise ValueError("The few-shot memory bank needs at least one layer.")
        self.taps = tuple(Tap(int(layer), TokenPath(path)) for layer, path in taps)
        self.fusion = FewShotFusion(fusion)
        self.register_buffer("memory", torch.zeros(len(self.taps), 0, dim))
        self.memory: torch.Tensor

    @property
    def active(self) -> bool:
        """Whether the bank holds references (an empty bank leaves the model zero-shot)."""
        return self.memory.shape[1] > 0

    @property
    def memory_bytes(self) -> int:
        """Size of the bank in bytes."""
        return self.memory.numel() * self.memory.element_size()

    def remember(self, tokens: Sequence[torch.Tensor]) -> None:
        """Fill the bank from the references' patch tokens: per tap, (k, N, D)."""
        if len(tokens) != len(self.taps):
            raise ValueError(f"Got patch tokens of {len(tokens)} taps for a bank of {len(self.taps)}.")
        rows = [F.normalize(layer.detach().flatten(0, 1).float(), dim=-1) for layer in tokens]
        self.memory = torch.stack(rows).to(self.memory.device)

    def without_rows(self, start: int, stop: int) -> FewShotScorer:
        """A scorer over this bank without rows ``start:stop`` (one reference left out)."""
        scorer = FewShotScorer(self.taps, self.fusion, self.memory.shape[-1])
        scorer.memory = torch.cat([self.memory[:, :start], self.memory[:, stop:]], dim=1)
        return scorer

    def distance_map(
        self, tokens: Sequence[torch.Tensor], grid: tuple[int, int], size: tuple[int, int]
    ) -> torch.Tensor:
        """Few-shot map (B, 1, H, W) before smoothing: mean over taps of the nearest-token distances, up-sampled."""
        distances = sum(nearest_distances(layer, bank) for layer, bank in zip(tokens, self.memory, strict=True))
        distances = (distances / len(self.taps)).reshape(-1, 1, *grid)
        return F.interpolate(distances, size=size, mode="bilinear", align_corners=False)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args) -> None:
        memory = state_dict.get(f"{prefix}memory")
        if memory is not None and (memory.shape[0], memory.shape[-1]) != (len(self.taps), self.memory.shape[-1]):
            raise ValueError(
                f"The stored few-shot bank has {memory.shape[0]} layer(s) of {memory.shape[-1]}-dim tokens; this "
                f"model reads {len(self.taps)} tap(s) of {self.memory.shape[-1]}-dim tokens. Use the few-shot "
                "layers, token path and backbone the checkpoint was made with."
            )
        if memory is not None:
            self.memory = torch.empty_like(memory, device=self.memory.device)  # the bank's size is the stored one
        super()._load_from_state_dict(state_dict, prefix, *args)


def score_leaving_out(
    scorer: FewShotScorer, count: int, score_one: Callable[[int, FewShotScorer], InferenceBatch]
) -> InferenceBatch:
    """Each of the ``count`` references of a filled bank scored against the bank without its own rows.

    Args:
        scorer: the bank of ``count`` references, each filling the same number of rows.
        count: the number of references.
        score_one: scores reference ``index`` with the bank it is given.

    Returns:
        Scores (count,) and maps of normal images, for thresholds.
    """
    rows = scorer.memory.shape[1] // count
    with torch.no_grad():
        outputs = [score_one(index, scorer.without_rows(index * rows, (index + 1) * rows)) for index in range(count)]
    return InferenceBatch(
        pred_score=torch.cat([output.pred_score for output in outputs]),
        anomaly_map=torch.cat([output.anomaly_map for output in outputs]),
    )


@dataclass(frozen=True)
class FewShotSettings:
    """The few-shot arguments of the model, checked.

    Attributes:
        k_shot: number of normal reference images (0: zero-shot).
        layers: visual blocks of the bank.
        tokens: stream the bank's tokens are read from.
        fusion: how the few-shot map joins the zero-shot map.
    """

    k_shot: int
    layers: tuple[int, ...]
    tokens: TokenPath
    fusion: FewShotFusion

    @property
    def taps(self) -> tuple[Tap, ...]:
        """One tap per bank layer."""
        return tuple(Tap(layer, self.tokens) for layer in self.layers)


def few_shot_settings(
    k_shot: int,
    layers: Sequence[int] | None,
    tokens: TokenPath | str,
    fusion: FewShotFusion | str,
    feature_layers: Sequence[int],
) -> FewShotSettings:
    """Checked few-shot settings; the bank's layers default to the model's feature layers."""
    if k_shot < 0:
        raise ValueError(f"k_shot must be 0 (zero-shot) or a positive number of reference images, got {k_shot}.")
    path = parse_choice(TokenPath, tokens, "few_shot.tokens")
    return FewShotSettings(
        k_shot,
        tuple(sorted(set(layers or feature_layers))),
        path,
        parse_choice(FewShotFusion, fusion, "few_shot.fusion"),
    )


def choose_references(paths: Sequence[str | Path], k_shot: int, seed: int, source: str) -> list[str]:
    """``k_shot`` of ``paths``, chosen reproducibly: a seeded sample of the sorted paths, returned sorted.

    Raises:
        ValueError: fewer than ``k_shot`` images are available.
    """
    ordered = sorted({str(path) for path in paths})
    if len(ordered) < k_shot:
        raise ValueError(
            f"k_shot={k_shot} needs {k_shot} normal reference images, but {source} holds {len(ordered)}. "
            "Lower --model.k_shot or point --model.few_shot.source at a folder with more normal images."
        )
    return sorted(random.Random(seed).sample(ordered, k_shot))

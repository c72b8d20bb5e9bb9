"""Cost of mutual scoring per image next to the encoder's, for pools of several sizes (``benchmarks/inference.py``).

Each pool size runs in a fresh process (``python -m anomalyclip_bench.mutual_cost --pool N``), so that its peak memory
is its own. The process builds AnomalyCLIP's torch model with random CLIP weights, times one encoder pass per image
(:meth:`~anomalib_anomalyclip.method.torch_model.AnomalyCLIPModel.encode_pool_member`: the visual encoder, the prompts'
score and map, and the mutual-scoring tokens) on a few images after a warm-up, then builds a pool of ``N`` members of
the same shapes and times :meth:`~anomalib_anomalyclip.method.torch_model.AnomalyCLIPModel.score_pool` (LNAMD, MSM,
maps, RsCIN, fusion). The members' tokens are random: the cost of mutual scoring depends on the tokens' shapes, not
their values, and encoding every image of a pool of 128 at 518 px would take an hour on a few CPU cores.

Reported per pool: encoder seconds per image, mutual-scoring seconds per image (the pool's time over ``N``), their
ratio, the pool's tokens in memory, the process's peak resident memory, and how much the scoring adds to the memory the
process holds before it (Linux: the peak is reset before scoring).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from .process_memory import peak_resident_mb, reset_peak, resident_mb

__all__ = ["MutualCost", "extrapolate", "measure_pool", "print_table", "report"]

MODEL_SEED = 0


@dataclass(frozen=True)
class MutualCost:
    """Cost of one pool size.

    Attributes:
        pool: images in the pool.
        encoder_seconds: one encoder pass per image (seconds per image).
        mutual_seconds: mutual scoring of the pool, per image.
        tokens_mb: the pool's mutual-scoring tokens (float16) in memory.
        peak_mb: peak resident memory of the process (model, pool and scoring).
        scoring_added_mb: peak resident memory while the pool was scored less the resident memory before
            (``nan`` where the peak cannot be reset).
    """

    pool: int
    encoder_seconds: float
    mutual_seconds: float
    tokens_mb: float
    peak_mb: float
    scoring_added_mb: float

    @property
    def ratio(self) -> float:
        """Mutual-scoring time per image over the encoder's."""
        return self.mutual_seconds / self.encoder_seconds


def measure_pool(backbone: str, image_size: int, pool: int, encoded: int = 2, blocks: Sequence[int] = ()) -> MutualCost:
    """Time the encoder on ``encoded`` images and mutual scoring on a pool of ``pool`` images (see the module)."""
    from anomalib_anomalyclip.method.mutual import MutualScoring
    from anomalib_anomalyclip.method.pooled_model import EncodedBatch
    from anomalib_anomalyclip.method.torch_model import AnomalyCLIPModel

    torch.manual_seed(MODEL_SEED)
    model = AnomalyCLIPModel(backbone=backbone, pretrained=None, image_size=image_size).eval()
    depth = model.visual_encoder.depth
    blocks = tuple(blocks) or tuple(depth * quarter // 4 for quarter in range(1, 5))  # 6, 12, 18, 24 on ViT-L
    config = MutualScoring(blocks=blocks, rscin_k=(1, 2, 3), pool_size=max(pool, 200))  # the pool is one subset
    model.use_mutual_scoring(config)
    images = torch.randn(encoded + 1, 1, 3, image_size, image_size)
    member = model.encode_pool_member(images[0])  # warm-up
    start = time.perf_counter()
    for image in images[1:]:
        member = model.encode_pool_member(image)
    encoder_seconds = (time.perf_counter() - start) / encoded
    members = [_random_like(member, EncodedBatch) for _ in range(pool)]
    tokens_mb = sum(one.pool_tokens.numel() * one.pool_tokens.element_size() for one in members) / 2**20
    before = resident_mb() if reset_peak() else float("nan")
    start = time.perf_counter()
    model.score_pool(members)
    mutual_seconds = (time.perf_counter() - start) / pool
    peak = peak_resident_mb()
    return MutualCost(pool, encoder_seconds, mutual_seconds, tokens_mb, peak, peak - before)


def _random_like(member: object, kind: type) -> object:
    """A pool member of ``member``'s shapes with random values (float16 tokens, as the model keeps them)."""
    return kind(
        torch.rand_like(member.pred_score),
        torch.rand_like(member.anomaly_map),
        torch.randn_like(member.pool_tokens, dtype=torch.float32).half(),
        torch.randn_like(member.class_embedding),
    )


def report(pools: Sequence[int], backbone: str, image_size: int, encoded: int = 2) -> list[MutualCost]:
    """Measure each pool size in a fresh process and print the table; pools that fail are reported and skipped."""
    costs = []
    for pool in pools:
        command = [sys.executable, "-m", "anomalyclip_bench.mutual_cost", "--pool", str(pool)]
        command += ["--backbone", backbone, "--image-size", str(image_size), "--encoded", str(encoded)]
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            print(f"pool {pool}: failed (exit code {completed.returncode})\n{completed.stderr[-2000:]}", flush=True)
            continue
        costs.append(MutualCost(**json.loads(completed.stdout.strip().splitlines()[-1])))
        print(_line(costs[-1]), flush=True)
    print_table(costs, backbone, image_size)
    return costs


def print_table(costs: Sequence[MutualCost], backbone: str, image_size: int) -> None:
    """The Markdown table of :func:`report`."""
    print(f"\nMutual scoring, {backbone} at {image_size} px, random weights, {torch.get_num_threads()} CPU threads:")
    print("| pool | encoder s/image | mutual s/image | mutual / encoder | tokens MiB | peak MiB | scoring adds MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for cost in costs:
        print(
            f"| {cost.pool} | {cost.encoder_seconds:.2f} | {cost.mutual_seconds:.2f} | {cost.ratio:.2f}x | "
            f"{cost.tokens_mb:.0f} | {cost.peak_mb:.0f} | {cost.scoring_added_mb:.0f} |"
        )


def extrapolate(cost: MutualCost, counts: Sequence[int]) -> list[dict[str, float]]:
    """Print (and return) what runs of ``counts`` images cost when each pool is cut into subsets of ``cost.pool``.

    A run encodes each image once and scores its subsets; an image of a subset of ``n`` is compared with ``n - 1``
    others, so its mutual-scoring time is the measured one scaled by ``(n - 1) / (cost.pool - 1)``. Memory depends on
    the subset, not on the run: the measured process peak holds for every ``N``.
    """
    from anomalib_anomalyclip.method.mutual import MutualScoring, split_pool

    minimum = MutualScoring().min_pool
    rows = []
    print(f"\nExtrapolated from one subset of {cost.pool} (ViT-L/14@336, 518 px, {torch.get_num_threads()} threads):")
    print("| images | subsets | s/image | total hours | process peak GiB |")
    print("|---:|---:|---:|---:|---:|")
    for count in counts:
        subsets = split_pool(count, cost.pool, 0, minimum)
        mutual = sum(len(subset) * (len(subset) - 1) for subset in subsets) / (cost.pool - 1) * cost.mutual_seconds
        seconds = count * cost.encoder_seconds + mutual
        rows.append({"images": count, "subsets": len(subsets), "seconds": seconds, "peak_mb": cost.peak_mb})
        hours, peak_gib = seconds / 3600, cost.peak_mb / 1024
        print(f"| {count:,} | {len(subsets)} | {seconds / count:.1f} | {hours:.1f} | {peak_gib:.1f} |")
    return rows


def _line(cost: MutualCost) -> str:
    return (
        f"pool {cost.pool}: encoder {cost.encoder_seconds:.2f} s/image, mutual {cost.mutual_seconds:.2f} s/image "
        f"({cost.ratio:.2f}x), peak {cost.peak_mb:.0f} MiB"
    )


def main(argv: Sequence[str] | None = None) -> None:
    """One pool size in this process; prints its :class:`MutualCost` as a JSON line."""
    parser = argparse.ArgumentParser(description="Cost of mutual scoring for one pool size (see the module).")
    parser.add_argument("--pool", type=int, required=True)
    parser.add_argument("--backbone", default="ViT-L-14-336")
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--encoded", type=int, default=2, help="images timed through the encoder")
    args = parser.parse_args(argv)
    cost = measure_pool(args.backbone, args.image_size, args.pool, args.encoded)
    print(json.dumps(asdict(cost)))


if __name__ == "__main__":
    main()

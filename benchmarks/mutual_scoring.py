"""Cost of mutual scoring (MuSc) on a pool of random tokens: seconds per image.

By default times one (block, radius) pair of LNAMD + MSM through ``mutual_patch_scores`` and
multiplies by the number of pairs (blocks x radii; each pair costs the same), then adds the
up-sampling to the image size; ``--full`` times ``score_pool`` with every block and radius instead.

Usage::

    python benchmarks/mutual_scoring.py                          # N=32, 37x37 tokens, C=1024, 2 threads
    python benchmarks/mutual_scoring.py --full --images 16
    python benchmarks/mutual_scoring.py --device cuda --threads 16
"""

from __future__ import annotations

import argparse
import time

import torch

from anomalib_anomalyclip.method.mutual import MutualScoring, mutual_patch_scores, score_pool, upsample_maps


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(function, device: torch.device) -> float:
    _synchronise(device)
    start = time.perf_counter()
    function()
    _synchronise(device)
    return time.perf_counter() - start


def main() -> None:
    """Print the seconds per image of mutual scoring for the requested pool."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--grid", type=int, default=37, help="tokens per side (518 px / patch 14)")
    parser.add_argument("--channels", type=int, default=1024)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--radii", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full", action="store_true", help="time score_pool with every block and radius")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    grid, size = (args.grid, args.grid), (args.image_size, args.image_size)
    length = args.grid * args.grid
    blocks = tuple(range(args.blocks))
    tokens = [torch.randn(args.images, length, args.channels, device=device) for _ in blocks]
    pairs = len(blocks) * len(args.radii)
    print(f"N={args.images} images, L={length} tokens, C={args.channels}, {args.blocks} blocks x radii {args.radii}")
    print(f"device {device}, {torch.get_num_threads()} CPU threads")
    if args.full:
        config = MutualScoring(blocks=blocks, radii=tuple(args.radii), rscin_k=None)
        seconds = _timed(lambda: score_pool(tokens, grid, size, config), device)
        print(f"score_pool: {seconds:.1f} s")
    else:
        radius = args.radii[len(args.radii) // 2]
        config = MutualScoring(blocks=(0,), radii=(radius,), rscin_k=None)
        holder: dict[str, torch.Tensor] = {}
        pair_seconds = _timed(lambda: holder.update(scores=mutual_patch_scores(tokens[:1], grid, config)), device)
        upsample_seconds = _timed(lambda: upsample_maps(holder["scores"], size).flatten(1).amax(1), device)
        seconds = pair_seconds * pairs + upsample_seconds
        print(f"one (block, radius={radius}) pair: {pair_seconds:.1f} s; up-sampling: {upsample_seconds:.2f} s")
        print(f"estimate for {pairs} pairs: {seconds:.1f} s")
    print(f"{seconds / args.images:.2f} s per image")


if __name__ == "__main__":
    main()

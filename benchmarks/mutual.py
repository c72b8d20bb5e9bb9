r"""Mutual-scoring gain study: prompts alone, mutual alone, fused, with RsCIN, k_shot 0 and 4, several data seeds.

Trains prompts on generated auxiliary categories, then runs anomalib's ``Engine.test`` (``MVTecAD`` over generated
target categories no prompt saw: texture, object on a background, grayscale) once per setting, ``k_shot`` and seed
(see :mod:`anomalyclip_bench.mutual_study`). Prints one row per run, then the tables of docs/mutual_scoring.md:
the ``varied``
split (blobs, scratches, coloured stains and spots), the ``repeated`` split (most anomalous images hold the same
stain) and the pool-size study (``mutual.pool_size`` below the pool's size, zero-shot).

Usage::

    python benchmarks/mutual.py                                   # tiny random CLIP, seeds 0 1 2 (about 45 min)
    python benchmarks/mutual.py --seeds 0 --splits varied --no-pool-sizes   # a quick look
    python benchmarks/mutual.py --json results/mutual_study.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
from pathlib import Path

from anomalib_anomalyclip.testing.tiny_clip import TinyClipConfig, save_openai_state_dict
from anomalyclip_bench.few_shot_study import Row
from anomalyclip_bench.mutual_study import (
    SETTINGS,
    SPLITS,
    MutualStudyConfig,
    evaluate_split,
    markdown_table,
    pool_size_rows,
    pool_size_table,
    prepare_prompts,
)


def main() -> None:
    """Run the study and print its rows and tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(MutualStudyConfig.seeds))
    parser.add_argument("--shots", type=int, nargs="+", default=list(MutualStudyConfig.shots))
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--splits", nargs="+", choices=list(SPLITS), default=list(SPLITS))
    parser.add_argument("--pool-sizes", type=int, nargs="+", default=list(MutualStudyConfig.pool_sizes))
    parser.add_argument("--no-pool-sizes", action="store_true", help="skip the pool-size study")
    parser.add_argument("--epochs", type=int, default=MutualStudyConfig.epochs)
    parser.add_argument("--image-size", type=int, default=MutualStudyConfig.image_size)
    parser.add_argument("--work-dir", type=Path, default=None, help="kept after the run (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write every row to this file")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    config = MutualStudyConfig(
        image_size=args.image_size, epochs=args.epochs, seeds=tuple(args.seeds), shots=tuple(args.shots),
        settings=tuple(args.settings), splits=tuple(args.splits), pool_sizes=tuple(args.pool_sizes),
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as temporary:
        work_dir = args.work_dir or Path(temporary)
        clip_path = save_openai_state_dict(work_dir / "tiny_clip.pt", TinyClipConfig(), seed=0)
        prompts = prepare_prompts(work_dir, clip_path, config)
        rows = {split: evaluate_split(work_dir, clip_path, prompts, split, config) for split in config.splits}
        pools = [] if args.no_pool_sizes else pool_size_rows(work_dir, clip_path, prompts, config)
    _report(rows, pools, config)
    if args.json:
        every = [row for split_rows in rows.values() for row in split_rows] + pools
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([dataclasses.asdict(row) for row in every], indent=1))


def _report(rows: dict[str, list[Row]], pools: list[Row], config: MutualStudyConfig) -> None:
    for row in [row for split_rows in rows.values() for row in split_rows] + pools:
        print(
            f"{row.split:8s} seed {row.seed} {row.category:15s} k={row.k_shot} {row.fusion:13s} "
            f"image {row.image_auroc:.3f} pixel {row.pixel_auroc:.3f}"
        )
    seeds = ", ".join(str(seed) for seed in config.seeds)
    for split, split_rows in rows.items():
        print(f"\n{split} split, mean over {len(config.categories)} categories and seeds {seeds} (range over seeds):")
        print(markdown_table(split_rows, config.settings))
    if pools and "varied" in rows:
        print(f"\nPool size, varied split, k_shot = 0, seeds {seeds}:")
        print(pool_size_table(pools, rows["varied"], SPLITS["varied"].size))


if __name__ == "__main__":
    main()

r"""Few-shot gain study: zero-shot vs k normal references, each fusion, on generated categories.

Trains prompts on generated auxiliary categories, then scores generated target categories
(texture, object on a background, grayscale) that no prompt saw, zero-shot and with
k references (see :mod:`anomalib_anomalyclip.benchmarking.few_shot_study`). Prints one row
per category, k and fusion, then the mean table of the README.

Usage::

    python benchmarks/few_shot.py                       # tiny random CLIP, k = 1, 2, 4, 8
    python benchmarks/few_shot.py --shots 1 2 4 --epochs 10 --work-dir /tmp/few_shot
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from anomalib_anomalyclip.benchmarking.few_shot_study import (
    StudyConfig,
    evaluate,
    generate,
    markdown_table,
    train_prompts,
)
from anomalib_anomalyclip.tiny_clip import TinyClipConfig, save_openai_state_dict


def main() -> None:
    """Run the study and print its rows and table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--epochs", type=int, default=StudyConfig.epochs)
    parser.add_argument("--image-size", type=int, default=StudyConfig.image_size)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=None, help="kept after the run (default: a temporary one)")
    args = parser.parse_args()
    config = StudyConfig(image_size=args.image_size, shots=tuple(args.shots), epochs=args.epochs, seed=args.seed)
    with tempfile.TemporaryDirectory() as temporary:
        work_dir = args.work_dir or Path(temporary)
        clip_path = save_openai_state_dict(work_dir / "tiny_clip.pt", TinyClipConfig(), seed=0)
        auxiliary, targets = generate(work_dir, config)
        model = train_prompts(auxiliary, clip_path, work_dir / "runs", config)
        rows = evaluate(model, targets, config)
    for row in rows:
        print(
            f"{row.category:15s} {row.kind:9s} k={row.k_shot} {row.fusion:9s} "
            f"image {row.image_auroc:.3f} pixel {row.pixel_auroc:.3f}"
        )
    print(markdown_table(rows))


if __name__ == "__main__":
    main()

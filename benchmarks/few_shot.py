r"""Few-shot gain study: zero-shot vs k normal references, each fusion, on generated categories.

Trains prompts on generated auxiliary categories, then scores generated target categories
(texture, object on a background, grayscale) that no prompt saw, zero-shot and with
k references (see :mod:`anomalyclip_bench.few_shot_study`). Prints one row
per category, k and fusion, then the mean table of docs/few_shot.md.

``--false-alarms N`` then sets thresholds from normal images only (a ``from_train``
validation split, ``normal_quantile`` 0.95 unless ``--normal-quantile``) on target categories
with N normal train and N normal test images, and prints the share of the test normals
called anomalous next to the requested ``1 - normal_quantile``.

Usage::

    python benchmarks/few_shot.py                       # tiny random CLIP, k = 1, 2, 4, 8
    python benchmarks/few_shot.py --shots 1 2 4 --epochs 10 --work-dir /tmp/few_shot
    python benchmarks/few_shot.py --false-alarms 60          # and the false-alarm rates
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from anomalib_anomalyclip import AnomalyCLIP
from anomalib_anomalyclip.testing.tiny_clip import TinyClipConfig, save_openai_state_dict
from anomalib_anomalyclip.testing.toy_data import make_mvtec_like_dataset
from anomalyclip_bench.few_shot_study import (
    TARGET_KINDS,
    StudyConfig,
    evaluate,
    false_alarm_rate,
    generate,
    markdown_table,
    train_prompts,
)


def main() -> None:
    """Run the study and print its rows and table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--epochs", type=int, default=StudyConfig.epochs)
    parser.add_argument("--image-size", type=int, default=StudyConfig.image_size)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=None, help="kept after the run (default: a temporary one)")
    parser.add_argument("--false-alarms", type=int, default=0, help="normal images per split for the threshold check")
    parser.add_argument("--normal-quantile", type=float, default=0.95)
    args = parser.parse_args()
    config = StudyConfig(image_size=args.image_size, shots=tuple(args.shots), epochs=args.epochs, seed=args.seed)
    with tempfile.TemporaryDirectory() as temporary:
        work_dir = args.work_dir or Path(temporary)
        clip_path = save_openai_state_dict(work_dir / "tiny_clip.pt", TinyClipConfig(), seed=0)
        auxiliary, targets = generate(work_dir, config)
        model = train_prompts(auxiliary, clip_path, work_dir / "runs", config)
        rows = evaluate(model, targets, config)
        if args.false_alarms:
            prompts = model.model.save_prompts(work_dir / "prompts.pt")
            far = _false_alarms(work_dir, clip_path, prompts, config, args.false_alarms, args.normal_quantile)
    for row in rows:
        print(
            f"{row.category:15s} {row.kind:9s} k={row.k_shot} {row.fusion:9s} "
            f"image {row.image_auroc:.3f} pixel {row.pixel_auroc:.3f}"
        )
    print(markdown_table(rows))
    if args.false_alarms:
        print(
            f"\nFalse alarms on other normal images, normal_quantile {args.normal_quantile} "
            f"(requested rate {1 - args.normal_quantile:.1%}):"
        )
        for (category, k_shot), rate in far.items():
            print(f"  {category:15s} k={k_shot}: {rate:.1%}")


def _false_alarms(
    work_dir: Path, clip_path: Path, prompts: Path, config: StudyConfig, count: int, quantile: float
) -> dict[tuple[str, int], float]:
    root = make_mvtec_like_dataset(
        work_dir / "normals", list(TARGET_KINDS), image_size=config.image_size, n_train_good=count,
        n_test_good=count, n_test_defect=1, seed=config.seed + 1, overwrite=True, kinds=TARGET_KINDS,
    )  # fmt: skip
    rates = {}
    for category in TARGET_KINDS:
        for k_shot in (0, 4):
            model = AnomalyCLIP(
                pretrained=str(clip_path), image_size=config.image_size, prompt_weights=str(prompts),
                k_shot=k_shot, normal_quantile=quantile, visualizer=False, train_prompts=False,
            )  # fmt: skip
            rates[(category, k_shot)] = false_alarm_rate(model, root, category, work_dir / "far", config.seed)
    return rates


if __name__ == "__main__":
    main()

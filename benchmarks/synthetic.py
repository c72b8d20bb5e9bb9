r"""Prompts fine-tuned from scratch on synthetic anomalies of normal images, over several data and prompt seeds.

Runs :func:`anomalyclip_bench.synthetic_study.multi_seed_study`: for each data seed, three generated categories (a
texture, a grayscale one and an object on a dark background, :func:`~anomalyclip_bench.synthetic_study.seed_categories`)
and each seeded untrained start prompt, every setting fine-tunes the prompts on each category's normal train images
plus their Perlin anomalies (the ``synthetic`` source), then scores the category's real (generated) test defects
zero-shot. Prints the table of docs/adaptation.md. Rows are appended to ``<work-dir>/rows.jsonl`` as they come; a
second run with
the same ``--work-dir`` reuses them (resume, or print the table of a partial run).

Usage::

    python benchmarks/synthetic.py --work-dir /tmp/synthetic   # docs/adaptation.md's table (about 30 min, 2 cores)
    python benchmarks/synthetic.py --data-seeds 0 --prompt-seeds 7 --settings glocal:0.5 --image-size 64
"""

from __future__ import annotations

import argparse
import tempfile
from functools import partial
from pathlib import Path

import torch

from anomalib_anomalyclip.method.prompts import PromptConfig, PromptLearner, save_prompts
from anomalib_anomalyclip.testing.tiny_clip import TinyClipConfig, save_openai_state_dict
from anomalyclip_bench.few_shot_study import StudyConfig
from anomalyclip_bench.synthetic_study import (
    Setting,
    SyntheticConfig,
    multi_seed_study,
    multi_seed_table,
    read_rows,
    write_row,
)

SETTINGS = ("glocal:0.5", "local:0.75", "local:0.5", "glocal:0.75", "global:0.5", "glocal:0.25")


def _setting(text: str) -> Setting:
    loss, fraction = text.split(":")
    return Setting(loss, float(fraction))


def main() -> None:
    """Run (or resume) the study and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", type=_setting, nargs="+", help="loss:fraction pairs",
                        default=[_setting(text) for text in SETTINGS])  # fmt: skip
    parser.add_argument("--data-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--prompt-seeds", type=int, nargs="+", default=[7, 8, 9])
    parser.add_argument("--epochs", type=int, default=SyntheticConfig.epochs)
    parser.add_argument("--lr", type=float, default=SyntheticConfig.lr)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--n-train", type=int, default=8, help="normal train images per category")
    parser.add_argument("--n-test", type=int, default=8, help="normal and per-defect test images per category")
    parser.add_argument("--work-dir", type=Path, default=None, help="kept after the run (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = StudyConfig(image_size=args.image_size, shots=(), n_train_good=args.n_train, n_test=args.n_test)
    config = SyntheticConfig(data=data, epochs=args.epochs, lr=args.lr)
    with tempfile.TemporaryDirectory() as temporary:
        work_dir = args.work_dir or Path(temporary)
        work_dir.mkdir(parents=True, exist_ok=True)
        clip_path = save_openai_state_dict(work_dir / "tiny_clip.pt", TinyClipConfig(), seed=0)
        width = TinyClipConfig().text_width
        learners = {seed: PromptLearner(PromptConfig(width=width), torch.Generator().manual_seed(seed))
                    for seed in args.prompt_seeds}  # fmt: skip
        starts = {seed: save_prompts(learner, work_dir / f"untrained_{seed}.pt") for seed, learner in learners.items()}
        log = work_dir / "rows.jsonl"
        rows = multi_seed_study(
            work_dir, clip_path, starts, args.settings, args.data_seeds, config,
            done=read_rows(log), report=partial(write_row, log),
        )  # fmt: skip
        print(f"\n{args.epochs} epochs at lr {args.lr:g}, {args.image_size} px, data seeds {args.data_seeds}, "
              f"prompt seeds {args.prompt_seeds}")  # fmt: skip
        print(multi_seed_table(rows))


if __name__ == "__main__":
    main()

r"""Prompts adapted with synthetic anomalies on each category's normal images: start, adapted and other prompts.

Runs :func:`anomalyclip_bench.synthetic_study.run_study` twice: from seeded untrained prompts, and
from prompts trained on the generated auxiliary categories (what the authors' released prompts are to a real
product). Prints the README's tables, zero-shot and with ``--shots`` normal references (mean fusion).

Usage::

    python benchmarks/synthetic.py                        # 64 px, 10 epochs at lr 1e-3, k = 0 and 4
    python benchmarks/synthetic.py --epochs 5 --lr 3e-3 --work-dir /tmp/synthetic
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from anomalib_anomalyclip.prompts import PromptConfig, PromptLearner, save_prompts
from anomalib_anomalyclip.testing.tiny_clip import TinyClipConfig, save_openai_state_dict
from anomalyclip_bench.few_shot_study import StudyConfig, generate, train_prompts
from anomalyclip_bench.synthetic_study import SyntheticConfig, markdown_table, run_study


def main() -> None:
    """Run the study from both start prompts and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=SyntheticConfig.epochs)
    parser.add_argument("--lr", type=float, default=SyntheticConfig.lr)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--shots", type=int, nargs="*", default=[4])
    parser.add_argument("--work-dir", type=Path, default=None, help="kept after the run (default: a temporary one)")
    args = parser.parse_args()
    data = StudyConfig(image_size=args.image_size, shots=tuple(args.shots), n_train_good=8, n_test=8)
    config = SyntheticConfig(data=data, epochs=args.epochs, lr=args.lr)
    with tempfile.TemporaryDirectory() as temporary:
        work_dir = args.work_dir or Path(temporary)
        clip_path = save_openai_state_dict(work_dir / "tiny_clip.pt", TinyClipConfig(), seed=0)
        width = TinyClipConfig().text_width
        untrained = save_prompts(PromptLearner(PromptConfig(width=width), torch.Generator().manual_seed(7)),
                                 work_dir / "untrained.pt")  # fmt: skip
        auxiliary, _ = generate(work_dir / "other" / "data", data)
        other = train_prompts(auxiliary, clip_path, work_dir / "other" / "runs", data)
        other_prompts = other.model.save_prompts(work_dir / "other_categories.pt")
        for name, start in (("untrained prompts", untrained), ("prompts of the other categories", other_prompts)):
            results = run_study(work_dir / name.replace(" ", "_"), clip_path, start, config, other=False)
            print(f"\nStart: {name}; fine-tuning {args.epochs} epochs at lr {args.lr:g}")
            print(markdown_table(results, shots=(0, *args.shots)))


if __name__ == "__main__":
    main()

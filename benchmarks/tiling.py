r"""Tiled inference on large images with small defects: untiled, tiles only, tiles + global view; zero- and k-shot.

Runs :func:`anomalyclip_bench.tiling_study.run_study` with a tiny random CLIP (6 vision blocks, DPAM from block 3)
and prints the table of docs/tiling.md: image / pixel AUROC, mean over the data seeds and the three category kinds.

Prompts: ``untrained`` (seeded, never trained: what the test asserts with) or ``trained`` (learned on generated
auxiliary categories with the toy datasets' defects, the protocol of ``benchmarks/few_shot.py``).

Usage::

    python benchmarks/tiling.py                                 # seeds 0-4, 1536 px images, 448 px working size
    python benchmarks/tiling.py --prompts trained --seeds 0 1 2
    python benchmarks/tiling.py --few-shot-fusion few_shot --shots 4      # the bank's map alone (what the test asserts)
    python benchmarks/tiling.py --working-size 768 --stride 84 --work-dir /tmp/tiling
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from anomalib_anomalyclip.method.prompts import PromptConfig, PromptLearner, save_prompts
from anomalib_anomalyclip.testing.tiny_clip import TinyClipConfig, save_openai_state_dict
from anomalib_anomalyclip.testing.toy_data import make_mvtec_like_dataset
from anomalyclip_bench.few_shot_study import AUXILIARY_KINDS, fit_prompts
from anomalyclip_bench.tiling_study import TilingStudyConfig, markdown_table, run_study

MODEL_ARGS = (("dpam_start_layer", 3),)


def trained_prompts(work_dir: Path, clip_path: Path, input_size: int, epochs: int) -> Path:
    """Prompts learned on generated auxiliary categories (toy defects, none of the study's categories)."""
    from anomalib_anomalyclip import AnomalyCLIP

    auxiliary = make_mvtec_like_dataset(
        work_dir / "auxiliary", list(AUXILIARY_KINDS), image_size=input_size, n_train_good=2, n_test_good=6,
        n_test_defect=6, kinds=AUXILIARY_KINDS, defects=("blob", "scratch"), seed=100, overwrite=True,
    )  # fmt: skip
    model = AnomalyCLIP(pretrained=str(clip_path), image_size=input_size, epochs=epochs, visualizer=False,
                        **dict(MODEL_ARGS))  # fmt: skip
    fit_prompts(model, [{"format": "mvtec", "root": str(auxiliary)}], work_dir / "runs", epochs, 0)
    return model.model.save_prompts(work_dir / "trained_prompts.pt")


def main() -> None:
    """Run the study and print its table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--prompts", choices=("untrained", "trained"), default="untrained")
    parser.add_argument("--epochs", type=int, default=6, help="prompt training epochs (--prompts trained)")
    parser.add_argument("--image-size", type=int, default=TilingStudyConfig.image_size)
    parser.add_argument("--working-size", type=int, default=TilingStudyConfig.working_size)
    parser.add_argument("--stride", type=int, default=TilingStudyConfig.stride)
    parser.add_argument("--shots", type=int, nargs="+", default=[0, 4])
    parser.add_argument("--few-shot-fusion", choices=("mean", "harmonic", "few_shot"), default="mean")
    parser.add_argument("--work-dir", type=Path, default=None, help="kept after the run (default: a temporary one)")
    args = parser.parse_args()
    config = TilingStudyConfig(
        seeds=tuple(args.seeds), image_size=args.image_size, working_size=args.working_size, stride=args.stride,
        shots=tuple(args.shots), model_args=(*MODEL_ARGS, ("few_shot_fusion", args.few_shot_fusion)),
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as temporary:
        work_dir = args.work_dir or Path(temporary)
        clip_path = save_openai_state_dict(work_dir / "tiny_clip.pt", TinyClipConfig(vision_layers=6), seed=0)
        if args.prompts == "trained":
            prompts = trained_prompts(work_dir, clip_path, config.input_size, args.epochs)
        else:
            learner = PromptLearner(PromptConfig(width=TinyClipConfig().text_width), torch.Generator().manual_seed(7))
            prompts = save_prompts(learner, work_dir / "untrained_prompts.pt")
        start = time.perf_counter()
        rows = run_study(clip_path, prompts, config)
        tiles = config.tiling("mean").tile_count((config.working_size, config.working_size))
        settings = (
            f"{args.prompts} prompts, few-shot fusion {args.few_shot_fusion}; seeds {' '.join(map(str, args.seeds))}"
        )
        print(
            f"\n{settings}; {config.image_size} px images, defects {config.defect_size[0]:g}-{config.defect_size[1]:g} "
            f"px; input {config.input_size} px; working size {config.working_size} px, stride {config.stride} ({tiles} "
            f"tiles); pixel AUROC at {config.eval_size} px; {time.perf_counter() - start:.0f} s"
        )
        print(markdown_table(rows))


if __name__ == "__main__":
    main()

"""Run-scale cost of ``anomalib predict`` with mutual scoring: peak memory and time over a folder of N images.

Each run is a child process (``python -m anomalyclip_bench.run_scale --child ...``) that runs anomalib's command
line in-process and reports its own peak resident memory (:func:`.process_memory.peak_resident_mb`) and wall time,
so that runs of different N do not share an allocator. The tiny random CLIP (same layout as ViT-L/14@336, 64
channels) stands in for the real one: the figures show how memory and time grow with N, not the real model's cost.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer

from .process_memory import peak_resident_mb, reset_peak, resident_mb

__all__ = [
    "LoopPeak",
    "RunCost",
    "added_mb_per_image",
    "held_mb_per_image",
    "measure_predict",
    "prepare_folder",
    "prepare_models",
]

BLOCKS = 4  # mutual_blocks: 6, 12, 18, 24
HALF_BYTES = 2
EXACT_PEAK_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1"}


@dataclass(frozen=True)
class RunCost:
    """What one ``anomalib predict`` run cost.

    Attributes:
        images: images in the folder.
        seconds: wall time of the command (start-up included).
        peak_mb: peak resident memory of the process.
        loop_peak_mb: peak resident memory during the predict loop above the resident memory when it started
            (Linux; the start-up's imports and model loading left out, so it shows what the run's images cost).
        rows: rows of ``predictions.csv``.
    """

    images: int
    seconds: float
    peak_mb: float
    loop_peak_mb: float
    rows: int

    @property
    def seconds_per_image(self) -> float:
        """Wall time over the number of images (start-up included)."""
        return self.seconds / self.images


def held_mb_per_image(image_size: int, width: int = 64, patch: int = 14) -> float:
    """What the in-memory path held per image: float16 tokens of the mutual blocks and a float32 map, in MiB."""
    tokens = (image_size // patch) ** 2 * width * BLOCKS * HALF_BYTES
    return (tokens + image_size * image_size * 4) / (1 << 20)


def added_mb_per_image(smaller: RunCost, larger: RunCost) -> float:
    """Growth of the predict loop's peak memory per image of ``larger`` above ``smaller``."""
    return (larger.loop_peak_mb - smaller.loop_peak_mb) / (larger.images - smaller.images)


def prepare_models(folder: Path) -> tuple[Path, Path]:
    """The tiny CLIP's weights and seeded untrained prompts for it, written once into ``folder``."""
    import torch

    from anomalib_anomalyclip.method.prompts import PromptConfig, PromptLearner, save_prompts
    from anomalib_anomalyclip.testing.tiny_clip import TinyClipConfig, save_openai_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    config = TinyClipConfig()
    clip, prompts = folder / "tiny_clip_openai.pt", folder / "tiny_prompts.pt"
    if not clip.exists():
        save_openai_state_dict(clip, config, seed=0)
    if not prompts.exists():
        save_prompts(PromptLearner(PromptConfig(width=config.text_width), torch.Generator().manual_seed(7)), prompts)
    return clip, prompts


def prepare_folder(root: Path, count: int, image_size: int) -> Path:
    """A folder of ``count`` generated images (written once, reused)."""
    from anomalib_anomalyclip.testing.toy_data import write_image_folder

    folder = root / f"images_{count}_{image_size}"
    if len(list(folder.glob("*.png"))) != count:
        write_image_folder(folder, count, image_size=image_size)
    return folder


def measure_predict(
    folder: Path,
    clip: Path,
    prompts: Path,
    work_dir: Path,
    image_size: int,
    pool_size: int | None,
    exact_peak: bool = False,
    timeout: float = 3600,
) -> RunCost:
    """``anomalib predict`` over ``folder`` in a child process (mutual scoring unless ``pool_size`` is None).

    ``exact_peak``: glibc gives every allocation above 64 KiB its own mapping, returned to the system when freed,
    and uses one arena, so that the resident memory follows the live tensors (without it, the allocator's reuse
    of freed blocks moves the peak by about 15 MiB from run to run at 518 px).
    """
    arguments = [
        "predict", "--model", "AnomalyCLIP", "--model.pretrained", str(clip), "--model.image_size", str(image_size),
        "--model.prompt_weights", str(prompts), "--data", str(folder), "--default_root_dir", str(work_dir),
        "--trainer.enable_progress_bar", "false", "--trainer.callbacks", f"{__name__}.LoopPeak",
    ]  # fmt: skip
    if pool_size is not None:
        arguments += ["--model.mutual", "true", "--model.mutual.pool_size", str(pool_size)]
    command = [sys.executable, "-m", "anomalyclip_bench.run_scale", "--child", json.dumps(arguments)]
    search_path = os.pathsep.join(
        filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")])
    )
    environment = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": search_path}
    if exact_peak:
        environment.update(EXACT_PEAK_ALLOCATOR)
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"anomalib predict failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    (table,) = Path(work_dir).rglob("predictions.csv")
    rows = len(table.read_text().splitlines()) - 1
    images = len(list(folder.glob("*.png")))
    return RunCost(images, report["seconds"], report["peak_mb"], report["loop_peak_mb"], rows)


class LoopPeak(Callback):
    """Peak resident memory of the predict loop above the resident memory at its start (Linux ``clear_refs``)."""

    measured_mb = float("nan")

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Reset the process's peak to its current resident memory (before the model scores the pools)."""
        del trainer, pl_module
        reset_peak()
        self.start_mb = resident_mb()

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Keep the loop's peak growth."""
        del trainer, pl_module
        LoopPeak.measured_mb = peak_resident_mb() - self.start_mb


def _child(arguments: list[str]) -> None:
    """Run anomalib's command line in this process; print its wall time and peak memory as JSON."""
    import torch
    from anomalib.cli import AnomalibCLI

    from anomalib_anomalyclip.cli.patches import install

    install()  # as the ``anomalib`` command does for this package's models

    torch.set_num_threads(int(os.environ.get("RUN_SCALE_THREADS", "2")))
    start = time.perf_counter()
    AnomalibCLI(arguments)
    seconds = time.perf_counter() - start
    loop_peak = sys.modules[LoopPeak.__module__.replace("__main__", "anomalyclip_bench.run_scale")].LoopPeak  # as built
    print(json.dumps({"seconds": seconds, "peak_mb": peak_resident_mb(), "loop_peak_mb": loop_peak.measured_mb}))


def main(argv: Sequence[str] | None = None) -> None:
    """Print peak memory, seconds per image and total time of ``anomalib predict`` for each folder size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, nargs="+", default=[30, 280])
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--pool-size", type=int, default=10, help="mutual_pool_size; 0: no mutual scoring")
    parser.add_argument("--work-dir", type=Path, default=Path("run_scale_work"))
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument(
        "--exact-peak", action="store_true", help="allocator settings that make the peak follow the live tensors"
    )
    args = parser.parse_args(argv)
    if args.child:
        _child(json.loads(args.child))
        return
    clip, prompts = prepare_models(args.work_dir)
    pool_size = args.pool_size or None
    costs = []
    for count in args.images:
        folder = prepare_folder(args.work_dir, count, args.image_size)
        work_dir = args.work_dir / f"run_{count}"
        costs.append(measure_predict(folder, clip, prompts, work_dir, args.image_size, pool_size, args.exact_peak))
    held = held_mb_per_image(args.image_size)
    print(f"tiny CLIP at {args.image_size} px, mutual_pool_size={pool_size}; in-memory path held {held:.2f} MiB/image")
    print(f"{'images':>7} {'rows':>6} {'peak MiB':>9} {'loop peak MiB':>14} {'MiB/added image':>16} {'s/image':>8} "
          f"{'total s':>8}")  # fmt: skip
    for cost in costs:
        per_added = f"{added_mb_per_image(costs[0], cost):.3f}" if cost is not costs[0] else "-"
        print(f"{cost.images:>7} {cost.rows:>6} {cost.peak_mb:>9.1f} {cost.loop_peak_mb:>14.1f} {per_added:>16} "
              f"{cost.seconds_per_image:>8.3f} {cost.seconds:>8.1f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps([asdict(cost) for cost in costs], indent=1))


if __name__ == "__main__":
    main()

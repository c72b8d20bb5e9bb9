"""Run-scale cost of ``anomalib predict`` with mutual scoring: peak memory and time over a folder of N images.

Each run is a child process (``python -m anomalyclip_bench.run_scale --child ...``) that runs anomalib's command
line in-process and reports its own peak resident memory (:func:`.process_memory.peak_resident_mb`) and wall time,
so that runs of different N do not share an allocator. The tiny random CLIP (same layout as ViT-L/14@336, 64
channels) stands in for the real one: the figures show how memory and time grow with N, not the real model's cost.

Runners: ``eager`` (``--model AnomalyCLIP``) and ``openvino`` (the model exported once with ``anomalib export``, then
``--model ExportedAnomalyCLIP``). The real model's cost is extrapolated from one subset of ViT-L/14@336
(:mod:`.mutual_cost`, ``--extrapolate-pool``): a run costs an encoder pass per image plus the scoring of its subsets.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
    "export_openvino",
    "held_mb_per_image",
    "measure_predict",
    "model_arguments",
    "plot_run_scale",
    "prepare_folder",
    "prepare_models",
]

BLOCKS = 4  # mutual_blocks: 6, 12, 18, 24
RUNNERS = ("eager", "openvino")
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
        runner: ``eager`` or ``openvino``.
    """

    images: int
    seconds: float
    peak_mb: float
    loop_peak_mb: float
    rows: int
    runner: str = "eager"

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


def model_arguments(
    clip: Path, prompts: Path, image_size: int, pool_size: int | None, exported: Path | None = None
) -> list[str]:
    """``--model`` arguments of a run: the eager model, or ``exported`` (an ``.xml``) with the same pool size."""
    if exported is not None:
        arguments = ["--model", "ExportedAnomalyCLIP", "--model.path", str(exported)]
        return arguments + (["--model.pool_size", str(pool_size)] if pool_size is not None else [])
    arguments = [
        "--model", "AnomalyCLIP", "--model.pretrained", str(clip), "--model.image_size", str(image_size),
        "--model.prompt_weights", str(prompts),
    ]  # fmt: skip
    if pool_size is not None:
        arguments += ["--model.mutual", "true", "--model.mutual.pool_size", str(pool_size)]
    return arguments


def export_openvino(clip: Path, prompts: Path, image_size: int, pool_size: int | None, work_dir: Path) -> Path:
    """``anomalib export`` of the run's model to OpenVINO (f32), in a child process; the ``.xml`` written."""
    arguments = ["export", *model_arguments(clip, prompts, image_size, pool_size)]
    arguments += ["--export_type", "openvino", "--default_root_dir", str(work_dir)]
    _run_child(arguments, timeout=3600)
    return work_dir / "weights" / "openvino" / "model.xml"


def measure_predict(
    folder: Path,
    clip: Path,
    prompts: Path,
    work_dir: Path,
    image_size: int,
    pool_size: int | None,
    exact_peak: bool = False,
    timeout: float = 3600,
    exported: Path | None = None,
) -> RunCost:
    """``anomalib predict`` over ``folder`` in a child process (mutual scoring unless ``pool_size`` is None).

    ``exported``: run this OpenVINO export (:func:`export_openvino`) instead of the eager model.

    ``exact_peak``: glibc gives every allocation above 64 KiB its own mapping, returned to the system when freed,
    and uses one arena, so that the resident memory follows the live tensors (without it, the allocator's reuse
    of freed blocks moves the peak by about 15 MiB from run to run at 518 px).
    """
    shutil.rmtree(work_dir, ignore_errors=True)  # the run's results only
    arguments = [
        "predict", *model_arguments(clip, prompts, image_size, pool_size, exported), "--data", str(folder),
        "--default_root_dir", str(work_dir), "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks", f"{__name__}.LoopPeak",
    ]  # fmt: skip
    report = _run_child(arguments, timeout, exact_peak)
    (table,) = Path(work_dir).rglob("predictions.csv")
    rows = len(table.read_text().splitlines()) - 1
    images = len(list(folder.glob("*.png")))
    runner = "eager" if exported is None else "openvino"
    return RunCost(images, report["seconds"], report["peak_mb"], report["loop_peak_mb"], rows, runner)


def _run_child(arguments: list[str], timeout: float, exact_peak: bool = False) -> dict[str, float]:
    """Run anomalib's command line with ``arguments`` in a child process; its wall time and peak memory."""
    command = [sys.executable, "-m", "anomalyclip_bench.run_scale", "--child", json.dumps(arguments)]
    search_path = os.pathsep.join(
        filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")])
    )
    environment = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": search_path}
    if exact_peak:
        environment.update(EXACT_PEAK_ALLOCATOR)
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"anomalib {arguments[0]} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


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
    built = sys.modules.get("anomalyclip_bench.run_scale")  # the module anomalib built the callback from, if any
    loop_peak = built.LoopPeak.measured_mb if built is not None else float("nan")
    print(json.dumps({"seconds": seconds, "peak_mb": peak_resident_mb(), "loop_peak_mb": loop_peak}))


def main(argv: Sequence[str] | None = None) -> None:
    """Print peak memory, seconds per image and total time of ``anomalib predict`` for each folder size and runner."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, nargs="+", default=[30, 280])
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--pool-size", type=int, default=10, help="mutual_pool_size; 0: no mutual scoring")
    parser.add_argument(
        "--runners", nargs="*", choices=RUNNERS, default=["eager"], help="none: only the extrapolation, if asked for"
    )
    parser.add_argument("--work-dir", type=Path, default=Path("run_scale_work"))
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--chart", type=Path, help="also draw loop peak and seconds per image against N (PNG)")
    parser.add_argument(
        "--exact-peak", action="store_true", help="allocator settings that make the peak follow the live tensors"
    )
    parser.add_argument(
        "--extrapolate-pool", type=int, help="measure one subset of this size with ViT-L/14@336 and extrapolate to N"
    )
    parser.add_argument(
        "--from-json", type=Path, nargs="+", help="print and draw the runs of earlier --json files instead of running"
    )
    args = parser.parse_args(argv)
    if args.child:
        _child(json.loads(args.child))
        return
    pool_size = args.pool_size or None
    if args.from_json:
        costs = [RunCost(**run) for path in args.from_json for run in json.loads(path.read_text())]
    else:
        costs = _run_all(args.runners, args.images, args.image_size, pool_size, args.work_dir, args.exact_peak)
    if costs:
        print_table(costs, args.image_size, pool_size)
    if args.json and not args.from_json:
        args.json.write_text(json.dumps([asdict(cost) for cost in costs], indent=1))
    if args.chart and costs:
        print(f"chart: {plot_run_scale(costs, args.chart, args.image_size, pool_size)}")
    if args.extrapolate_pool:
        from .mutual_cost import extrapolate, report

        (subset,) = report([args.extrapolate_pool], "ViT-L-14-336", 518)
        extrapolate(subset, args.images)


def _run_all(
    runners: Sequence[str], counts: Sequence[int], image_size: int, pool_size: int | None, root: Path, exact: bool
) -> list[RunCost]:
    """One ``anomalib predict`` per runner and folder size (the OpenVINO runner exports the model first)."""
    clip, prompts = prepare_models(root)
    costs = []
    for runner in runners:
        exported = None
        if runner == "openvino":
            exported = export_openvino(clip, prompts, image_size, pool_size, root / "export_openvino")
        for count in counts:
            folder = prepare_folder(root, count, image_size)
            work_dir = root / f"run_{runner}_{count}"
            cost = measure_predict(folder, clip, prompts, work_dir, image_size, pool_size, exact, exported=exported)
            costs.append(cost)
            print(f"{runner} {count} images: {cost.seconds:.0f} s, loop peak {cost.loop_peak_mb:.1f} MiB", flush=True)
    return costs


def print_table(costs: Sequence[RunCost], image_size: int, pool_size: int | None) -> None:
    """The Markdown table of the runs: memory growth per added image is against each runner's first run."""
    held = held_mb_per_image(image_size)
    print(f"\ntiny CLIP at {image_size} px, mutual_pool_size={pool_size}; in-memory path held {held:.2f} MiB/image")
    print("| runner | images | rows | peak MiB | loop peak MiB | MiB per added image | s/image | total s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for cost in costs:
        first = next(run for run in costs if run.runner == cost.runner)
        per_added = f"{added_mb_per_image(first, cost):.3f}" if cost is not first else "-"
        print(f"| {cost.runner} | {cost.images:,} | {cost.rows:,} | {cost.peak_mb:.1f} | {cost.loop_peak_mb:.1f} | "
              f"{per_added} | {cost.seconds_per_image:.3f} | {cost.seconds:.0f} |")  # fmt: skip


def plot_run_scale(costs: Sequence[RunCost], path: Path, image_size: int, pool_size: int | None) -> Path:
    """Two panels against the number of images (log scale): the loop's peak memory and seconds per image."""
    from matplotlib.figure import Figure  # imported here: matplotlib is only needed for the chart

    figure = Figure(figsize=(9, 3.6), layout="constrained")
    memory, speed = figure.subplots(1, 2)
    for runner in dict.fromkeys(cost.runner for cost in costs):
        runs = [cost for cost in costs if cost.runner == runner]
        images = [cost.images for cost in runs]
        memory.plot(images, [cost.loop_peak_mb for cost in runs], marker="o", label=runner)
        speed.plot(images, [cost.seconds_per_image for cost in runs], marker="o", label=runner)
    for axis, label in ((memory, "predict loop's peak above its start (MiB)"), (speed, "seconds per image")):
        axis.set_xscale("log")
        axis.set_xticks(
            sorted({cost.images for cost in costs}), labels=[f"{n:,}" for n in sorted({c.images for c in costs})]
        )
        axis.minorticks_off()
        axis.set_xlabel("images in the folder")
        axis.set_ylabel(label)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend()
    pool = f"mutual.pool_size {pool_size}" if pool_size else "no mutual scoring"
    figure.suptitle(f"anomalib predict, tiny CLIP at {image_size} px, {pool}")
    figure.savefig(path, dpi=110)
    return path


if __name__ == "__main__":
    main()

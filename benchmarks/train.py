r"""Prompt training with and without the feature cache: wall time and peak memory.

On a generated MVTec-layout dataset, in fresh processes (so that peak memory is each
run's own), this script measures

* one feature-extraction pass over the training set (data loading, pre-processing and
  the visual encoder under ``torch.no_grad``: an eager inference pass without the text side),
* prompt training for N epochs with the feature cache (``float32`` unless told otherwise),
* prompt training for N epochs without it,

and prints the times, the peak memory (process RSS; CUDA peak allocation on a GPU), the
uncached/cached speed-up, the ratio "N cached epochs / one extraction pass" (target
<= 1.3 for N = 15) and how much the prompts of the two trainings (same seeds) differ:
the largest absolute difference and the norm of the difference relative to the norm of
what the uncached training learned (final minus initial prompts).

Why they differ at all with ``float32`` storage: a cached epoch reads the features that
the first epoch computed, while an uncached epoch recomputes them in batches of another
composition, which rounds differently (about 1e-7 relative). Adam's normalised steps turn
such differences into full-size (lr) steps for prompt numbers whose gradient is close to
zero, so after many steps a few numbers differ by up to about lr x steps.
``--rounding-floor`` shows that this is rounding, not caching: it adds a second uncached
training with another number of torch threads (other kernel blocking, other rounding) and
prints how much *it* differs from the first.

Validation is off in these runs (``limit_val_batches=0``): it is not prompt training.
``--validate`` turns it on after every epoch, as ``anomalib fit`` does; the validation
images are the training images, which the cache also serves.

Usage::

    python benchmarks/train.py                                  # tiny random CLIP, 15 epochs
    # the real architecture with random weights, few images, the uncached run shortened:
    python benchmarks/train.py --backbone ViT-L-14-336 --pretrained none --image-size 518 \
        --categories 1 --images-per-class 4 --uncached-epochs 1
    # normal train images with synthetic anomalies (a fixed set, cached), or new anomalies every epoch (no cache)
    python benchmarks/train.py --synthetic
    python benchmarks/train.py --synthetic --regenerate
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from anomalyclip_bench.process_memory import peak_resident_mb

MODES = ("extract", "cached", "uncached")
FLOOR = "floor"
TARGET_RATIO = 1.3


def _arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15, help="epochs of the cached run")
    parser.add_argument("--uncached-epochs", type=int, default=None, help="epochs of the uncached run (default: same)")
    parser.add_argument("--categories", type=int, default=2, help="generated categories")
    parser.add_argument("--images-per-class", type=int, default=4, help="normal and anomalous test images per category")
    parser.add_argument("--data-size", type=int, default=64, help="side of the generated images")
    parser.add_argument("--image-size", type=int, default=56, help="model input side (a multiple of the patch size)")
    parser.add_argument("--backbone", default="ViT-L-14-336", help="open_clip model name (with --pretrained none/tag)")
    parser.add_argument(
        "--pretrained", default="tiny", help="'tiny' (a generated tiny CLIP), 'none' (random weights), a file or a tag"
    )
    parser.add_argument("--feature-layers", type=int, nargs="*", default=None, help="visual blocks of the maps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu")
    parser.add_argument("--cache-dtype", default="float32", choices=("float32", "float16"))
    parser.add_argument("--rounding-floor", action="store_true", help="add an uncached run with other thread count")
    parser.add_argument("--validate", action="store_true", help="validate after every epoch, as anomalib fit does")
    parser.add_argument(
        "--synthetic", action="store_true", help="train on the normal train images with synthetic anomalies instead"
    )
    parser.add_argument("--regenerate", action="store_true", help="with --synthetic: new anomalies every epoch")
    parser.add_argument("--workdir", type=Path, default=None, help="where data and results go (default: a temp dir)")
    parser.add_argument("--worker", choices=(*MODES, FLOOR), default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------------------------------
# Worker processes: one measurement each
# --------------------------------------------------------------------------------------------------------------------


def _pretrained(args: argparse.Namespace) -> str | None:
    if args.pretrained == "tiny":
        return str(args.workdir / "tiny_clip.pt")
    return None if args.pretrained == "none" else args.pretrained


def _build(args: argparse.Namespace, mode: str) -> tuple[Any, Any]:
    from anomalib_anomalyclip import AnomalyCLIP
    from anomalib_anomalyclip.data import AuxiliaryDataModule

    model = AnomalyCLIP(
        backbone=args.backbone,
        pretrained=_pretrained(args),
        image_size=args.image_size,
        feature_layers=args.feature_layers,
        epochs=_epochs(args, mode),
        feature_cache=mode == "cached",
        feature_cache_dtype=args.cache_dtype,
        evaluator=False,
        visualizer=False,
    )
    sources = None
    if args.synthetic:
        synthetic = {"format": "synthetic", "root": str(args.workdir / "data"), "anomalous_fraction": 0.5, "seed": 0}
        sources = [{**synthetic, "output_dir": str(args.workdir / "synthetic"), "regenerate": args.regenerate}]
    datamodule = AuxiliaryDataModule(
        sources=sources,
        root=None if sources else args.workdir / "data",
        train_batch_size=args.batch_size,
        eval_batch_size=args.batch_size,
        num_workers=args.num_workers,
    )
    return model, datamodule


def _epochs(args: argparse.Namespace, mode: str) -> int:
    return args.uncached_epochs if mode in ("uncached", FLOOR) and args.uncached_epochs else args.epochs


def _floor_threads(threads: int) -> int:
    """Another thread count than ``threads``."""
    return 2 if threads == 1 else threads // 2


def _device(args: argparse.Namespace) -> Any:
    import torch

    use_cuda = args.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return torch.device("cuda" if use_cuda else "cpu")


def _extract(args: argparse.Namespace, model: Any, datamodule: Any) -> dict[str, Any]:
    """One pass of the visual encoder over the training set, as the first training epoch runs it."""
    import torch

    device = _device(args)
    encoder = model.model.visual_encoder.to(device)
    transform = model.pre_processor.transform
    datamodule.setup("fit")
    start = time.perf_counter()
    with torch.no_grad():
        for batch in datamodule.train_dataloader():
            encoder(transform(batch.image.to(device)))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - start, "images": len(datamodule.train_data)}


def _train(args: argparse.Namespace, mode: str, model: Any, datamodule: Any) -> dict[str, Any]:
    import torch
    from lightning.pytorch import Callback, Trainer

    from anomalib_anomalyclip.integration.feature_cache import FeatureLayout

    epoch_seconds: list[float] = []

    class EpochTimer(Callback):
        def on_train_epoch_start(self, trainer: Trainer, pl_module: Any) -> None:
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer: Trainer, pl_module: Any) -> None:
            epoch_seconds.append(time.perf_counter() - self.start)

    trainer = Trainer(
        accelerator=args.accelerator,
        devices=1,
        max_epochs=_epochs(args, mode),
        limit_val_batches=1.0 if args.validate else 0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        default_root_dir=args.workdir / "runs" / mode,
        callbacks=[EpochTimer()],
    )
    torch.save(model.model.prompt_learner.state_dict(), args.workdir / "prompts_initial.pt")
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    seconds = time.perf_counter() - start
    torch.save(model.model.prompt_learner.state_dict(), args.workdir / f"prompts_{mode}.pt")
    encoder = model.model.visual_encoder
    layout = FeatureLayout.for_encoder(encoder, (args.image_size, args.image_size), args.cache_dtype)
    return {
        "seconds": seconds,
        "epoch_seconds": epoch_seconds,
        "images": len(datamodule.train_data),
        "cache": layout.describe(len(datamodule.train_data)),
    }


def _worker(args: argparse.Namespace) -> None:
    import logging
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker == FLOOR:
        torch.set_num_threads(_floor_threads(torch.get_num_threads()))
    model, datamodule = _build(args, args.worker)
    built_mb = peak_resident_mb()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = (
        _extract(args, model, datamodule) if args.worker == "extract" else _train(args, args.worker, model, datamodule)
    )
    peak_mb = peak_resident_mb()
    result.update(mode=args.worker, built_rss_mb=built_mb, peak_rss_mb=peak_mb, threads=torch.get_num_threads())
    if torch.cuda.is_available():
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 1e6
    print(json.dumps(result))


# --------------------------------------------------------------------------------------------------------------------
# Parent: prepare, run the workers, report
# --------------------------------------------------------------------------------------------------------------------


def _prepare(args: argparse.Namespace) -> None:
    from anomalib_anomalyclip.testing.toy_data import make_mvtec_like_dataset

    categories = tuple(f"category{index}" for index in range(args.categories))
    count = args.images_per_class
    make_mvtec_like_dataset(
        args.workdir / "data",
        categories=categories,
        image_size=args.data_size,
        n_train_good=2 * count if args.synthetic else 4,  # --synthetic trains on the normal train images
        n_test_good=count,
        n_test_defect=count,
    )
    if args.pretrained == "tiny":
        from anomalib_anomalyclip.testing.tiny_clip import TinyClipConfig, save_openai_state_dict

        save_openai_state_dict(args.workdir / "tiny_clip.pt", TinyClipConfig(), seed=0)


def _run_worker(argv: list[str], mode: str, workdir: Path) -> dict[str, Any]:
    command = [sys.executable, __file__, *argv, "--workdir", str(workdir), "--worker", mode]  # the last one counts
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{mode} run failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _prompt_difference(workdir: Path, mode: str) -> str:
    """How the prompts of run ``mode`` differ from those of the uncached run."""
    import torch

    def flat(name: str) -> torch.Tensor:
        state = torch.load(workdir / f"prompts_{name}.pt", weights_only=True)
        return torch.cat([tensor.float().flatten() for tensor in state.values()])

    other, uncached, initial = flat(mode), flat("uncached"), flat("initial")
    relative = (other - uncached).norm() / (uncached - initial).norm()
    return (
        f"largest |difference| {(other - uncached).abs().max():.3g}, ||difference|| / ||learned change|| {relative:.3g}"
    )


def _memory_text(result: dict[str, Any]) -> str:
    growth = result["peak_rss_mb"] - result["built_rss_mb"]
    text = f"peak RSS {result['peak_rss_mb']:.0f} MB ({growth:+.0f} MB over the built model)"
    if "cuda_peak_mb" in result:
        text += f", CUDA peak {result['cuda_peak_mb']:.0f} MB"
    return text


def _report(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> None:
    extract, cached, uncached = results["extract"], results["cached"], results["uncached"]
    epochs, uncached_epochs = args.epochs, _epochs(args, "uncached")
    later = cached["epoch_seconds"][1:] or cached["epoch_seconds"]
    print(
        f"AnomalyCLIP prompt training: {extract['images']} images, input {args.image_size}x{args.image_size}, "
        f"batch {args.batch_size}, CLIP {args.pretrained if args.pretrained == 'tiny' else args.backbone} "
        f"(pretrained={args.pretrained}), {extract['threads']} torch thread(s), device {_device(args)}"
    )
    print(f"feature-extraction pass:        {extract['seconds']:8.2f} s   {_memory_text(extract)}")
    print(f"training, no cache, {uncached_epochs:2d} epochs:  {uncached['seconds']:8.2f} s   {_memory_text(uncached)}")
    print(f"training, cache,    {epochs:2d} epochs:  {cached['seconds']:8.2f} s   {_memory_text(cached)}")
    print(f"  cache: {cached['cache']}")
    print(
        f"  cached epochs: first {cached['epoch_seconds'][0]:.2f} s (fills the cache), "
        f"later {sum(later) / len(later):.3f} s on average"
    )
    uncached_per_epoch = uncached["seconds"] / uncached_epochs
    scaled = "" if uncached_epochs == epochs else f" (uncached time scaled from {uncached_epochs} to {epochs} epochs)"
    print(f"speed-up, uncached / cached time: {uncached_per_epoch * epochs / cached['seconds']:.2f}x{scaled}")
    ratio = cached["seconds"] / extract["seconds"]
    verdict = "meets" if ratio <= TARGET_RATIO else "misses"
    print(f"{epochs} cached epochs / one extraction pass: {ratio:.2f} ({verdict} the target <= {TARGET_RATIO})")
    print(f"peak RSS, cached training - extraction pass: {cached['peak_rss_mb'] - extract['peak_rss_mb']:+.0f} MB")
    if uncached_epochs == epochs:
        print(f"prompts, cached ({args.cache_dtype}) vs uncached: {_prompt_difference(args.workdir, 'cached')}")
    if FLOOR in results:
        threads = results[FLOOR]["threads"]
        print(f"prompts, uncached with {threads} threads vs uncached: {_prompt_difference(args.workdir, FLOOR)}")


def main(argv: list[str] | None = None) -> None:
    """Run the three measurements in fresh processes and print the comparison."""
    argv = sys.argv[1:] if argv is None else argv
    args = _arguments(argv)
    if args.worker:
        _worker(args)
        return
    with tempfile.TemporaryDirectory(prefix="anomalyclip-train-benchmark-") as temporary:
        args.workdir = (args.workdir or Path(temporary)).absolute()
        _prepare(args)
        modes = (*MODES, FLOOR) if args.rounding_floor else MODES
        results = {mode: _run_worker(argv, mode, args.workdir) for mode in modes}
        _report(args, results)


if __name__ == "__main__":
    main()

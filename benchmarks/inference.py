"""Inference speed and memory of AnomalyCLIP: eager fp32 and bf16, and every exported flavour.

Builds AnomalyCLIP with random CLIP weights (``pretrained=None``: timing does not depend
on weight values), exports it through anomalib's own ``to_torch``/``to_onnx``/
``to_openvino`` (the paths of ``anomalib export``), then runs each flavour in a fresh
process on the same images, one image per call after one warm-up call:

* ``eager-fp32``, ``eager-bf16``: the anomalib module in PyTorch (bf16: CPU autocast);
* ``torch``: the ``to_torch`` file through anomalib's ``TorchInferencer``;
* ``onnx``: the ONNX file, run by the OpenVINO runtime (``OpenVINOInferencer``);
* ``openvino-fp32``, ``openvino-bf16``: the OpenVINO IR with the f32 / bf16 inference
  precision hint;
* ``openvino-fp16``, ``openvino-int8``, ``openvino-int8-ptq``: anomalib's compression
  options (FP16 weights; INT8 weights; INT8 post-training quantisation calibrated on
  synthetic MVTec-format images);
* ``eager-fp32-tiled-N`` (N = 1, 4, 9, 16): tiled inference (:mod:`anomalib_anomalyclip.method.tiling`) with N tiles of
  the input size, at a working size of sqrt(N) times the input size, plus the global view: N + 1 encoder inputs per
  image in one call; after the table, each one's time per image against N + 1 times eager fp32's;
* ``clip-visual-fp32``: open_clip's plain visual forward at the same size (no DPAM, no
  scoring), a yardstick that relates the figures to plain CLIP measured in the same run;
* ``reference-fp32`` (with ``--reference-repo``): the reference implementation's own code
  (a local checkout of github.com/zqhang/AnomalyCLIP, see ``anomalyclip_bench/reference_anomalyclip.py``)
  with the same weights and prompts, doing per image what its ``test.py`` does.

``--mutual-pools 8 32 128`` prints instead the cost of mutual scoring per image next to the encoder's, and the
peak memory, for pools of those sizes (see :mod:`anomalyclip_bench.mutual_cost`; each pool in its own process).

``--device cuda`` runs the PyTorch flavours (eager, ``torch``, plain CLIP, reference) on
the GPU (bf16: CUDA autocast; timings synchronise the device; peak memory is the CUDA
allocator's peak).

Every flavour sees the whole pipeline (resize, normalisation, model, post-processing).
Printed per flavour and batch size: seconds per image, images per second, speed-up over eager
fp32 at the same batch size, the model's TFLOP/s and, when a peak is known, its FLOPs
utilisation (MFU), the peak memory of its process (loading plus inference; on CUDA the
allocator's peak for that batch size), and the largest absolute difference of its
``pred_score`` and ``anomaly_map`` from eager fp32 at the first batch size.

The model's FLOPs per image are counted once, on eager fp32 (see
:mod:`anomalyclip_bench.throughput`), and used for every flavour, the
reference's included (it does the same work). MFU is measured against ``--peak-tflops``,
or on CUDA against the published dense bf16 peak of the GPU found by its name (H100, H200,
A100, L4), whatever precision the flavour runs in.

Usage::

    python benchmarks/inference.py                          # ViT-L-14-336 at 518 px (many minutes on 2 cores)
    python benchmarks/inference.py --backbone ViT-B-16 --image-size 224 --images 2   # a quick run
    python benchmarks/inference.py --flavours eager-fp32 openvino-fp32 openvino-bf16
    python benchmarks/inference.py --backbone ViT-B-16 --image-size 224 --images 2 \
        --flavours eager-fp32 eager-fp32-tiled-1 eager-fp32-tiled-4 eager-fp32-tiled-9 eager-fp32-tiled-16
    python benchmarks/inference.py --reference-repo ../AnomalyCLIP --flavours eager-fp32 reference-fp32 openvino-fp32
    python benchmarks/inference.py --device cuda --images 20 --reference-repo ../AnomalyCLIP
    python benchmarks/inference.py --mutual-pools 8 32 128     # mutual scoring's cost (CPU, many minutes for 128)
    python benchmarks/inference.py --device cuda --batch-sizes 1 8 32 --images 64 --compile \
        --flavours eager-fp32 eager-bf16 reference-fp32 --reference-repo ../AnomalyCLIP
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomalyclip_bench import mutual_cost
from anomalyclip_bench.process_memory import peak_resident_mb
from anomalyclip_bench.report import processor_name
from anomalyclip_bench.throughput import (
    count_flops,
    cyclic_batches,
    model_flops_utilisation,
    published_peak_tflops,
)
from anomalyclip_bench.tiling_study import tiled_arguments, tiled_cost_lines

DATASET_CATEGORY = "bench"
TILE_COUNTS = (1, 4, 9, 16)
MODEL_SEED = 0


@dataclass(frozen=True)
class Flavour:
    """One way of running the model.

    Attributes:
        name: the flavour's name on the command line and in the table.
        export_type: anomalib export type (``torch``, ``onnx``, ``openvino``), ``None`` for eager.
        compression: anomalib compression type for OpenVINO (``FP16``, ``INT8``, ``INT8_PTQ``).
        precision: eager: ``f32``, ``bf16`` or ``f16`` (autocast); OpenVINO: the inference precision hint.
        plain_clip: open_clip's own visual forward instead of AnomalyCLIP (a yardstick, no outputs to compare).
        reference: the reference implementation's code instead of ours.
        k_shot: few-shot references in the memory bank (0: zero-shot); its outputs differ from
            zero-shot by design, so no agreement is printed for it.
        tiles: tiles per image of tiled inference (a square number; 0: untiled); no agreement is printed.
    """

    name: str
    export_type: str | None = None
    compression: str | None = None
    precision: str = "f32"
    plain_clip: bool = False
    reference: bool = False
    k_shot: int = 0
    tiles: int = 0

    @property
    def runs_in_torch(self) -> bool:
        """Whether PyTorch runs it (so it can run on a CUDA device); OpenVINO runs the others."""
        return self.export_type in (None, "torch")

    @property
    def artifact(self) -> str | None:
        """File stem of the exported model this flavour runs (shared by flavours that differ in precision only)."""
        if self.export_type is None:
            return None
        return f"{self.export_type}_{(self.compression or 'fp32').lower()}"


FLAVOURS = {
    flavour.name: flavour
    for flavour in (
        Flavour("eager-fp32"),
        Flavour("eager-bf16", precision="bf16"),
        Flavour("eager-fp16", precision="f16"),
        Flavour("eager-fp32-4shot", k_shot=4),
        *(Flavour(f"eager-fp32-tiled-{tiles}", tiles=tiles) for tiles in TILE_COUNTS),
        Flavour("torch", export_type="torch"),
        Flavour("onnx", export_type="onnx"),
        Flavour("openvino-fp32", export_type="openvino"),
        Flavour("openvino-bf16", export_type="openvino", precision="bf16"),
        Flavour("openvino-fp16", export_type="openvino", compression="FP16"),
        Flavour("openvino-int8", export_type="openvino", compression="INT8"),
        Flavour("openvino-int8-ptq", export_type="openvino", compression="INT8_PTQ"),
        Flavour("clip-visual-fp32", plain_clip=True),
        Flavour("reference-fp32", reference=True),
    )
}
BASELINE = "eager-fp32"
SUFFIXES = {"torch": ".pt", "onnx": ".onnx", "openvino": ".xml"}
AUTOCAST_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="ViT-L-14-336", help="open_clip model name (random weights)")
    parser.add_argument("--image-size", type=int, default=518, help="model input side in pixels")
    parser.add_argument(
        "--images", type=int, default=3, help="timed images per flavour and batch size (at least one whole batch)"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1], help="images per call, e.g. 1 8 32")
    parser.add_argument("--compile", action="store_true", help="torch.compile the eager flavours' model")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="device peak for MFU (default on CUDA: the GPU's published)"
    )
    parser.add_argument("--calibration-images", type=int, default=8, help="images for INT8 post-training quantisation")
    parser.add_argument("--flavours", nargs="+", choices=sorted(FLAVOURS), default=None, help="default: all that apply")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the PyTorch flavours run")
    parser.add_argument("--reference-repo", type=Path, default=None, help="checkout of zqhang/AnomalyCLIP")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep exports and results here (default: temp)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this file")
    parser.add_argument("--run-flavour", choices=sorted(FLAVOURS), help=argparse.SUPPRESS)
    parser.add_argument("--mutual-pools", type=int, nargs="+", default=None, help="mutual scoring's cost per pool size")
    args = parser.parse_args(argv)
    if args.flavours is None:
        args.flavours = [name for name, flavour in FLAVOURS.items() if _applies(flavour, args)]
    for name in args.flavours:
        if FLAVOURS[name].reference and args.reference_repo is None:
            parser.error(f"{name} needs --reference-repo (a checkout of github.com/zqhang/AnomalyCLIP)")
        if args.device == "cuda" and not FLAVOURS[name].runs_in_torch:
            parser.error(f"{name} runs in OpenVINO on the CPU; leave it out with --device cuda")
    if min(args.batch_sizes) < 1:
        parser.error("--batch-sizes must be positive")
    if args.reference_repo is not None:
        args.reference_repo = args.reference_repo.resolve()
    args.flavours = [BASELINE, *(name for name in args.flavours if name != BASELINE)]  # the ratios' baseline first
    return args


def _applies(flavour: Flavour, args: argparse.Namespace) -> bool:
    if (flavour.reference and args.reference_repo is None) or flavour.tiles:  # tiled flavours: when named
        return False
    if flavour.precision == "f16" and flavour.export_type is None:  # fp16 autocast pays off on GPUs only
        return args.device == "cuda"
    return args.device == "cpu" or flavour.runs_in_torch


def build_model(args: argparse.Namespace, work_dir: Path, k_shot: int = 0, tiles: int = 0) -> torch.nn.Module:
    """The anomalib module with seeded random CLIP weights and fixed (seeded, untrained) prompts.

    With ``k_shot``, the memory bank holds that many of the generated normal train images; with ``tiles``, the model
    tiles (see :func:`anomalyclip_bench.tiling_study.tiled_arguments`).
    """
    from anomalib_anomalyclip import AnomalyCLIP

    torch.manual_seed(MODEL_SEED)
    references = dataset_root(args, work_dir) / DATASET_CATEGORY / "train" / "good"
    model = AnomalyCLIP(
        backbone=args.backbone,
        pretrained=None,
        image_size=args.image_size,
        prompt_weights=str(prompt_file(args, work_dir)),
        k_shot=k_shot,
        few_shot_source=str(references) if k_shot else None,
        **tiled_arguments(args.image_size, tiles),
        visualizer=False,
        evaluator=False,
    ).eval()
    if k_shot:
        model.collect_references(required=True)
        print(f"{k_shot}-shot {model.model.describe_bank()}", flush=True)
    return model


def prompt_file(args: argparse.Namespace, work_dir: Path) -> Path:
    """Seeded prompts for the backbone's text width, written once (a model needs prompts to export)."""
    import open_clip

    from anomalib_anomalyclip.method.prompts import PromptConfig, PromptLearner, save_prompts

    path = work_dir / f"prompts_{args.backbone}.pt"
    if not path.exists():
        width = open_clip.get_model_config(args.backbone)["text_cfg"]["width"]
        save_prompts(PromptLearner(PromptConfig(width=width), torch.Generator().manual_seed(111)), path)
    return path


def dataset_root(args: argparse.Namespace, work_dir: Path) -> Path:
    """Synthetic MVTec-format images at the model's input size (inputs and INT8 calibration data)."""
    from anomalib_anomalyclip.testing.toy_data import make_mvtec_like_dataset

    root = work_dir / "data"
    if (root / DATASET_CATEGORY).is_dir():
        return root
    count = max(args.images + 1, args.calibration_images) // 2 + 1
    make_mvtec_like_dataset(
        root, categories=(DATASET_CATEGORY,), image_size=args.image_size, n_train_good=4, n_test_good=count,
        n_test_defect=count,
    )  # fmt: skip
    return root


def input_images(args: argparse.Namespace, work_dir: Path) -> list[torch.Tensor]:
    """The warm-up image followed by the timed images, (1, 3, H, W) in [0, 1]."""
    from anomalib.data.utils import read_image

    test_dir = dataset_root(args, work_dir) / DATASET_CATEGORY / "test"
    paths = sorted(test_dir.rglob("*.png"))[: args.images + 1]
    return [read_image(path, as_tensor=True).unsqueeze(0) for path in paths]


def export_all(args: argparse.Namespace, work_dir: Path) -> dict[str, Path]:
    """Export every artifact the chosen flavours need; returns artifact name -> file."""
    flavours = [FLAVOURS[name] for name in args.flavours if FLAVOURS[name].artifact]
    artifacts = {flavour.artifact: artifact_path(flavour, work_dir) for flavour in flavours}
    artifacts = {name: path for name, path in artifacts.items() if path.exists()}  # kept from an earlier run
    flavours = [flavour for flavour in flavours if flavour.artifact not in artifacts]
    if not flavours:
        return artifacts
    model = build_model(args, work_dir)
    for flavour in flavours:
        if flavour.artifact in artifacts:
            continue
        start = time.perf_counter()
        try:
            artifacts[flavour.artifact] = export_one(model, flavour, args, work_dir)
        except Exception as error:  # one failed export must not stop the other flavours
            print(f"export {flavour.artifact} failed: {type(error).__name__}: {error}", flush=True)
            continue
        print(f"exported {flavour.artifact} in {time.perf_counter() - start:.0f} s", flush=True)
    del model
    gc.collect()
    return artifacts


def export_one(model: torch.nn.Module, flavour: Flavour, args: argparse.Namespace, work_dir: Path) -> Path:
    """Export ``model`` as ``flavour`` needs, through anomalib's own export methods."""
    root, name = work_dir / "exports", flavour.artifact
    if flavour.export_type == "torch":
        return model.to_torch(root, name)
    if flavour.export_type == "onnx":
        return model.to_onnx(root, name)
    from anomalib.data import MVTecAD
    from anomalib.deploy.export import CompressionType

    compression = CompressionType[flavour.compression] if flavour.compression else None
    datamodule = None
    if compression is CompressionType.INT8_PTQ:
        datamodule = MVTecAD(
            root=dataset_root(args, work_dir), category=DATASET_CATEGORY, eval_batch_size=1, num_workers=0
        )
    return model.to_openvino(root, name, compression_type=compression, datamodule=datamodule)


def run_flavour(args: argparse.Namespace, work_dir: Path) -> None:
    """Child process: load one flavour, score the images at each batch size, write timings, memory and outputs."""
    flavour = FLAVOURS[args.run_flavour]
    images = input_images(args, work_dir)
    start = time.perf_counter()
    predict, module = load_flavour(flavour, args, work_dir)
    result: dict[str, Any] = {"load_seconds": time.perf_counter() - start, "flops_per_image": None}
    if module is not None:  # eager: the first call computes and caches the text features, before any compiling
        predict(images[0])
        if flavour.name == BASELINE:
            result["flops_per_image"] = float(count_flops(predict, images[0]))
        if args.compile:
            module.model.compile()
    result["batches"], outputs = {}, {}
    for batch_size in args.batch_sizes:
        timing, scores, maps = time_batch_size(predict, images, batch_size, args)
        result["batches"][str(batch_size)] = timing
        outputs[f"scores_{batch_size}"], outputs[f"maps_{batch_size}"] = scores, maps
    results_dir = work_dir / "results"
    results_dir.mkdir(exist_ok=True)
    (results_dir / f"{flavour.name}.json").write_text(json.dumps(result))
    np.savez(results_dir / f"{flavour.name}.npz", **outputs)


def time_batch_size(
    predict: Callable[[torch.Tensor], Any], images: list[torch.Tensor], batch_size: int, args: argparse.Namespace
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Time whole batches of ``batch_size`` after one warm-up batch.

    Returns:
        ``{"seconds": per batch, "peak_mb": ...}``, and the scores (N,) and flattened maps (N, H*W) of the
        ``args.images`` timed images in order (empty for plain CLIP).
    """
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    predict(torch.cat([images[0]] * batch_size))  # warm-up (allocations, lazy initialisation, compilation)
    _synchronise(args.device)
    seconds, scores, maps = [], [], []
    for batch in cyclic_batches(images[1:], batch_size, args.images):
        start = time.perf_counter()
        output = predict(batch)
        _synchronise(args.device)
        seconds.append(time.perf_counter() - start)
        if output is not None:
            scores.append(output.pred_score.detach().float().cpu().reshape(batch_size).numpy())
            maps.append(output.anomaly_map.detach().float().cpu().reshape(batch_size, -1).numpy())
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else peak_resident_mb()
    timing = {"seconds": seconds, "peak_mb": peak_mb}
    return timing, _joined(scores)[: args.images], _joined(maps)[: args.images]


def _synchronise(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def load_flavour(
    flavour: Flavour, args: argparse.Namespace, work_dir: Path
) -> tuple[Callable[[torch.Tensor], Any], torch.nn.Module | None]:
    """A function from (B, 3, H, W) images to the ``InferenceBatch`` of ``flavour`` (``None`` for plain CLIP).

    Returns:
        The function, and for the eager flavours the anomalib module it runs (``None`` for the others).
    """
    if flavour.plain_clip:
        return plain_clip_visual(args), None
    if flavour.reference:
        return reference_implementation(args, work_dir), None
    if flavour.export_type is None:
        return eager_model(flavour, args, work_dir)
    from anomalib_anomalyclip.integration.exported_model import ExportedGraph

    path = artifact_path(flavour, work_dir)
    if flavour.export_type == "torch":
        return ExportedGraph(path, device=args.device), None
    return ExportedGraph(path, device="CPU", config={"INFERENCE_PRECISION_HINT": flavour.precision}), None


def eager_model(
    flavour: Flavour, args: argparse.Namespace, work_dir: Path
) -> tuple[Callable[[torch.Tensor], Any], torch.nn.Module]:
    """The anomalib module on the device, and a function that runs it under the flavour's autocast."""
    device = torch.device(args.device)
    model = build_model(args, work_dir, flavour.k_shot, flavour.tiles).to(device)
    dtype = AUTOCAST_DTYPES[flavour.precision]

    def predict(images: torch.Tensor) -> Any:
        autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
        with torch.inference_mode(), autocast:
            return model(images.to(device))

    return predict, model


def plain_clip_visual(args: argparse.Namespace) -> Callable[[torch.Tensor], None]:
    """open_clip's visual forward at the same input size: plain CLIP, no DPAM, no scoring."""
    import open_clip

    torch.manual_seed(MODEL_SEED)
    clip = open_clip.create_model(args.backbone, force_image_size=args.image_size, force_quick_gelu=True)
    visual = clip.visual.eval().to(args.device)
    del clip

    def predict(image: torch.Tensor) -> None:
        with torch.inference_mode():
            visual(image.to(args.device))

    return predict


def reference_implementation(args: argparse.Namespace, work_dir: Path) -> Callable[[torch.Tensor], Any]:
    """The reference code with the weights and prompts of ``build_model`` (same seed, same prompt file)."""
    from anomalib.data import InferenceBatch

    from anomalib_anomalyclip.method.backbone import load_clip
    from anomalib_anomalyclip.method.prompts import read_prompt_checkpoint
    from anomalyclip_bench.reference_anomalyclip import load_reference

    torch.manual_seed(MODEL_SEED)  # the random CLIP of build_model: same seed, same loader
    state_dict = load_clip(args.backbone, pretrained=None).state_dict()
    prompts = read_prompt_checkpoint(prompt_file(args, work_dir))
    device = torch.device(args.device)
    score = load_reference(args.reference_repo, state_dict, prompts, args.image_size, device)

    def predict(image: torch.Tensor) -> InferenceBatch:
        pred_score, anomaly_map = score(image)
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)

    return predict


def artifact_path(flavour: Flavour, work_dir: Path) -> Path:
    """Where anomalib's export writes the file of ``flavour`` (under ``work_dir/exports``)."""
    return work_dir / "exports" / "weights" / flavour.export_type / f"{flavour.artifact}{SUFFIXES[flavour.export_type]}"


def spawn(flavour: str, argv: list[str], work_dir: Path) -> dict | None:
    """Run one flavour in a fresh process (its own peak memory); ``None`` when it failed."""
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--work-dir", str(work_dir)]
    env = {**os.environ, "TRUST_REMOTE_CODE": "1", "PYTHONWARNINGS": "ignore"}
    # The working directory takes OpenVINOInferencer's openvino_cache folder.
    completed = subprocess.run([*command, "--run-flavour", flavour], cwd=work_dir, env=env, check=False)
    if completed.returncode != 0:
        print(f"{flavour}: failed (exit code {completed.returncode})", flush=True)
        return None
    results_dir = work_dir / "results"
    result = json.loads((results_dir / f"{flavour}.json").read_text())
    with np.load(results_dir / f"{flavour}.npz") as outputs:
        return {**result, **{name: outputs[name] for name in outputs.files}}


def summarise(
    name: str, batch_size: int, result: dict, baseline: dict, args: argparse.Namespace, peak_tflops: float | None
) -> dict:
    """One row (flavour at one batch size) against eager fp32 (``baseline``).

    Speed-up: over eager fp32 at the same batch size. Agreement: with eager fp32's outputs at the first batch size.
    """
    timing, key = result["batches"][str(batch_size)], str(batch_size)
    per_image = float(np.mean(timing["seconds"])) / batch_size
    baseline_per_image = float(np.mean(baseline["batches"][key]["seconds"])) / batch_size
    first = args.batch_sizes[0]
    flops = baseline["flops_per_image"] * (FLAVOURS[name].tiles + 1 if FLAVOURS[name].tiles else 1)  # views per image
    comparable = not FLAVOURS[name].k_shot and not FLAVOURS[name].tiles
    return {
        "flavour": name,
        "batch_size": batch_size,
        "seconds_per_image": per_image,
        "images_per_second": 1 / per_image,
        "speedup_vs_eager_fp32": baseline_per_image / per_image,
        "tflops_per_second": flops / per_image / 1e12,
        "mfu": None if peak_tflops is None else model_flops_utilisation(flops, 1 / per_image, peak_tflops),
        "peak_mb": timing["peak_mb"],
        "load_seconds": result["load_seconds"],
        "max_abs_score_diff": _max_difference(result[f"scores_{key}"], baseline[f"scores_{first}"], comparable),
        "max_abs_map_diff": _max_difference(result[f"maps_{key}"], baseline[f"maps_{first}"], comparable),
    }


def print_table(rows: list[dict], args: argparse.Namespace, baseline: dict, peak_tflops: float | None) -> None:
    """The results as a text table, with the run's settings."""
    compiled = ", eager flavours torch.compile-d" if args.compile else ""
    print(
        f"\n{args.backbone} at {args.image_size} px, random weights, {args.images} timed images per flavour and batch "
        f"size, batch sizes {' '.join(map(str, args.batch_sizes))}{compiled}; {processor_name()}, "
        f"{os.cpu_count()} CPUs; torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"OpenVINO {_openvino_version()}; PyTorch flavours on {_device_name(args)}"
    )
    peak = "no peak given (--peak-tflops)" if peak_tflops is None else f"MFU against {peak_tflops:g} TFLOP/s"
    print(f"model: {baseline['flops_per_image'] / 1e9:.4g} GFLOP per image (counted on eager fp32); {peak}")
    first = args.batch_sizes[0]
    print(
        f"eager fp32 output range (batch {first}): score {baseline[f'scores_{first}'].min():.4f}.."
        f"{baseline[f'scores_{first}'].max():.4f}, map {baseline[f'maps_{first}'].min():.4f}.."
        f"{baseline[f'maps_{first}'].max():.4f}"
    )
    memory = "GPU MB" if args.device == "cuda" else "peak MB"
    header = f"{'flavour':<19}{'batch':>6}{'s/image':>9}{'images/s':>10}{'vs eager fp32':>15}{'TFLOP/s':>9}"
    print(header + f"{'MFU':>7}{memory:>9}{'load s':>8}{'max|d score|':>14}{'max|d map|':>12}")
    for row in rows:
        mfu = "" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        print(
            f"{row['flavour']:<19}{row['batch_size']:>6}{row['seconds_per_image']:>9.3g}"
            f"{row['images_per_second']:>10.3g}{row['speedup_vs_eager_fp32']:>14.2f}x{row['tflops_per_second']:>9.3g}"
            f"{mfu:>7}{row['peak_mb']:>9.0f}{row['load_seconds']:>8.1f}"
            f"{row['max_abs_score_diff']:>14.2e}{row['max_abs_map_diff']:>12.2e}"
        )


def peak_of_device(args: argparse.Namespace) -> float | None:
    """``--peak-tflops``, else on CUDA the GPU's published dense bf16 peak (``None`` when unknown)."""
    if args.peak_tflops is not None or args.device != "cuda":
        return args.peak_tflops
    name = torch.cuda.get_device_name()
    peak = published_peak_tflops(name)
    if peak is None:
        print(f"No published peak known for {name!r}: pass --peak-tflops for the MFU column.", flush=True)
    return peak


def main(argv: list[str] | None = None) -> None:
    """Export, run every flavour in its own process, print the table."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.run_flavour:
        run_flavour(args, args.work_dir)
        return
    if args.mutual_pools:
        mutual_cost.report(args.mutual_pools, args.backbone, args.image_size)
        return
    peak_tflops = peak_of_device(args)
    with tempfile.TemporaryDirectory(prefix="anomalyclip-inference-") as temporary:
        work_dir = (args.work_dir or Path(temporary)).resolve()
        work_dir.mkdir(parents=True, exist_ok=True)
        export_all(args, work_dir)
        child_argv = _without_option(_without_option(argv, "--work-dir"), "--reference-repo")
        if args.reference_repo is not None:
            child_argv += ["--reference-repo", str(args.reference_repo)]
        results, rows = {}, []
        for name in args.flavours:  # eager fp32 first: each row is printed (and saved) as soon as it is known
            result = spawn(name, child_argv, work_dir)
            if result is None:
                continue
            if BASELINE not in results and name != BASELINE:
                raise SystemExit("eager fp32 failed; no ratios to print.")  # it runs first
            results[name] = result
            for batch_size in args.batch_sizes:
                rows.append(summarise(name, batch_size, result, results[BASELINE], args, peak_tflops))
                print(_progress_line(rows[-1]), flush=True)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=2))
        if BASELINE not in results:
            raise SystemExit("eager fp32 failed; no ratios to print.")
        print_table(rows, args, results[BASELINE], peak_tflops)
        print(tiled_cost_lines(rows, {name: flavour.tiles for name, flavour in FLAVOURS.items()}, BASELINE))


def _progress_line(row: dict) -> str:
    mfu = "" if row["mfu"] is None else f", MFU {100 * row['mfu']:.1f}%"
    return (
        f"{row['flavour']} batch {row['batch_size']}: {row['seconds_per_image']:.3g} s/image, "
        f"{row['images_per_second']:.3g} images/s, {row['speedup_vs_eager_fp32']:.2f}x eager fp32{mfu}, "
        f"max |d score| {row['max_abs_score_diff']:.2e}, max |d map| {row['max_abs_map_diff']:.2e}"
    )


def _openvino_version() -> str:
    try:
        import openvino
    except ImportError:
        return "not installed"
    return openvino.__version__


def _device_name(args: argparse.Namespace) -> str:
    return torch.cuda.get_device_name() if args.device == "cuda" else "the CPU"


def _joined(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros(0)


def _max_difference(values: np.ndarray, reference: np.ndarray, comparable: bool = True) -> float:
    """Largest absolute difference; NaN when there is nothing to compare (plain CLIP, few-shot)."""
    if not comparable or values.shape != reference.shape:
        return float("nan")
    return float(np.abs(values - reference).max())


def _without_option(argv: list[str], option: str) -> list[str]:
    """``argv`` without ``option`` and its value."""
    cleaned, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(f"{option}="):
            cleaned.append(arg)
    return cleaned


if __name__ == "__main__":
    main()

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
* ``clip-visual-fp32``: open_clip's plain visual forward at the same size (no DPAM, no
  scoring), a yardstick that relates the figures to plain CLIP measured in the same run;
* ``reference-fp32`` (with ``--reference-repo``): the reference implementation's own code
  (a local checkout of github.com/zqhang/AnomalyCLIP, see ``reference_anomalyclip.py``)
  with the same weights and prompts, doing per image what its ``test.py`` does.

``--device cuda`` runs the PyTorch flavours (eager, ``torch``, plain CLIP, reference) on
the GPU (bf16: CUDA autocast; timings synchronise the device; peak memory is the CUDA
allocator's peak).

Every flavour sees the whole pipeline (resize, normalisation, model, post-processing).
Printed per flavour: seconds per image, images per second, speed-up over eager fp32 of
the same run, the peak resident memory of its process (loading plus inference), and the
largest absolute difference of its ``pred_score`` and ``anomaly_map`` from eager fp32.

Usage::

    python benchmarks/inference.py                          # ViT-L-14-336 at 518 px (many minutes on 2 cores)
    python benchmarks/inference.py --backbone ViT-B-16 --image-size 224 --images 2   # a quick run
    python benchmarks/inference.py --flavours eager-fp32 openvino-fp32 openvino-bf16
    python benchmarks/inference.py --reference-repo ../AnomalyCLIP --flavours eager-fp32 reference-fp32 openvino-fp32
    python benchmarks/inference.py --device cuda --images 20 --reference-repo ../AnomalyCLIP
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
from process_memory import peak_resident_mb

from anomalib_anomalyclip.benchmarking.report import processor_name

DATASET_CATEGORY = "bench"
MODEL_SEED = 0


@dataclass(frozen=True)
class Flavour:
    """One way of running the model.

    Attributes:
        name: the flavour's name on the command line and in the table.
        export_type: anomalib export type (``torch``, ``onnx``, ``openvino``), ``None`` for eager.
        compression: anomalib compression type for OpenVINO (``FP16``, ``INT8``, ``INT8_PTQ``).
        precision: eager: ``f32`` or ``bf16`` (CPU autocast); OpenVINO: the inference precision hint.
        plain_clip: open_clip's own visual forward instead of AnomalyCLIP (a yardstick, no outputs to compare).
        reference: the reference implementation's code instead of ours.
    """

    name: str
    export_type: str | None = None
    compression: str | None = None
    precision: str = "f32"
    plain_clip: bool = False
    reference: bool = False

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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="ViT-L-14-336", help="open_clip model name (random weights)")
    parser.add_argument("--image-size", type=int, default=518, help="model input side in pixels")
    parser.add_argument("--images", type=int, default=3, help="timed images per flavour (after one warm-up)")
    parser.add_argument("--calibration-images", type=int, default=8, help="images for INT8 post-training quantisation")
    parser.add_argument("--flavours", nargs="+", choices=sorted(FLAVOURS), default=None, help="default: all that apply")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the PyTorch flavours run")
    parser.add_argument("--reference-repo", type=Path, default=None, help="checkout of zqhang/AnomalyCLIP")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep exports and results here (default: temp)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this file")
    parser.add_argument("--run-flavour", choices=sorted(FLAVOURS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.flavours is None:
        args.flavours = [name for name, flavour in FLAVOURS.items() if _applies(flavour, args)]
    for name in args.flavours:
        if FLAVOURS[name].reference and args.reference_repo is None:
            parser.error(f"{name} needs --reference-repo (a checkout of github.com/zqhang/AnomalyCLIP)")
        if args.device == "cuda" and not FLAVOURS[name].runs_in_torch:
            parser.error(f"{name} runs in OpenVINO on the CPU; leave it out with --device cuda")
    if args.reference_repo is not None:
        args.reference_repo = args.reference_repo.resolve()
    args.flavours = [BASELINE, *(name for name in args.flavours if name != BASELINE)]  # the ratios' baseline first
    return args


def _applies(flavour: Flavour, args: argparse.Namespace) -> bool:
    if flavour.reference and args.reference_repo is None:
        return False
    return args.device == "cpu" or flavour.runs_in_torch


def build_model(args: argparse.Namespace, work_dir: Path) -> torch.nn.Module:
    """The anomalib module with seeded random CLIP weights and fixed (seeded, untrained) prompts."""
    from anomalib_anomalyclip import AnomalyCLIP

    torch.manual_seed(MODEL_SEED)
    return AnomalyCLIP(
        backbone=args.backbone,
        pretrained=None,
        image_size=args.image_size,
        prompt_weights=str(prompt_file(args, work_dir)),
        visualizer=False,
        evaluator=False,
    ).eval()


def prompt_file(args: argparse.Namespace, work_dir: Path) -> Path:
    """Seeded prompts for the backbone's text width, written once (a model needs prompts to export)."""
    import open_clip

    from anomalib_anomalyclip.prompts import PromptConfig, PromptLearner, save_prompts

    path = work_dir / f"prompts_{args.backbone}.pt"
    if not path.exists():
        width = open_clip.get_model_config(args.backbone)["text_cfg"]["width"]
        save_prompts(PromptLearner(PromptConfig(width=width), torch.Generator().manual_seed(111)), path)
    return path


def dataset_root(args: argparse.Namespace, work_dir: Path) -> Path:
    """Synthetic MVTec-format images at the model's input size (inputs and INT8 calibration data)."""
    from anomalib_anomalyclip.data.synthetic import make_mvtec_like_dataset

    root = work_dir / "data"
    if (root / DATASET_CATEGORY).is_dir():
        return root
    count = max(args.images + 1, args.calibration_images) // 2 + 1
    make_mvtec_like_dataset(
        root, categories=(DATASET_CATEGORY,), image_size=args.image_size, n_train_good=1, n_test_good=count,
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
    """Child process: load one flavour, score the images, write timings, memory and outputs."""
    flavour = FLAVOURS[args.run_flavour]
    images = input_images(args, work_dir)
    start = time.perf_counter()
    predict = load_flavour(flavour, args, work_dir)
    load_seconds = time.perf_counter() - start
    predict(images[0])  # warm-up (first-call allocations, OpenVINO's lazy initialisation)
    seconds, scores, maps = [], [], []
    for image in images[1:]:
        start = time.perf_counter()
        output = predict(image)
        _synchronise(args.device)
        seconds.append(time.perf_counter() - start)
        if output is not None:
            scores.append(output.pred_score.detach().float().cpu().reshape(-1).numpy())
            maps.append(output.anomaly_map.detach().float().cpu().reshape(-1).numpy())
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else peak_resident_mb()
    result = {"seconds": seconds, "peak_mb": peak_mb, "load_seconds": load_seconds}
    results_dir = work_dir / "results"
    results_dir.mkdir(exist_ok=True)
    (results_dir / f"{flavour.name}.json").write_text(json.dumps(result))
    np.savez(results_dir / f"{flavour.name}.npz", scores=_joined(scores), maps=_joined(maps))


def _synchronise(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def load_flavour(flavour: Flavour, args: argparse.Namespace, work_dir: Path) -> Callable[[torch.Tensor], Any]:
    """A function from a (1, 3, H, W) image to the ``InferenceBatch`` of ``flavour`` (``None`` for plain CLIP)."""
    if flavour.plain_clip:
        return plain_clip_visual(args)
    if flavour.reference:
        return reference_implementation(args, work_dir)
    device = torch.device(args.device)
    if flavour.export_type is None:
        model = build_model(args, work_dir).to(device)
        dtype = torch.bfloat16 if flavour.precision == "bf16" else torch.float32

        def predict(image: torch.Tensor) -> Any:
            autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
            with torch.inference_mode(), autocast:
                return model(image.to(device))

        return predict
    from anomalib_anomalyclip.exported_model import ExportedGraph

    path = artifact_path(flavour, work_dir)
    if flavour.export_type == "torch":
        return ExportedGraph(path, device=args.device)
    return ExportedGraph(path, device="CPU", config={"INFERENCE_PRECISION_HINT": flavour.precision})


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
    from reference_anomalyclip import load_reference

    from anomalib_anomalyclip.backbone import load_clip
    from anomalib_anomalyclip.prompts import read_prompt_checkpoint

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
    outputs = np.load(results_dir / f"{flavour}.npz")
    return {**result, "scores": outputs["scores"], "maps": outputs["maps"]}


def summarise(name: str, result: dict, baseline: dict) -> dict:
    """One flavour's row: s/image, images/s, speed-up and agreement with eager fp32 (``baseline``)."""
    per_image = float(np.mean(result["seconds"]))
    return {
        "flavour": name,
        "seconds_per_image": per_image,
        "images_per_second": 1 / per_image,
        "speedup_vs_eager_fp32": float(np.mean(baseline["seconds"])) / per_image,
        "peak_mb": result["peak_mb"],
        "load_seconds": result["load_seconds"],
        "max_abs_score_diff": _max_difference(result["scores"], baseline["scores"]),
        "max_abs_map_diff": _max_difference(result["maps"], baseline["maps"]),
    }


def print_table(rows: list[dict], args: argparse.Namespace, baseline: dict) -> None:
    """The results as a text table, with the run's settings."""
    print(
        f"\n{args.backbone} at {args.image_size} px, random weights, {args.images} timed images per flavour, "
        f"batch 1; {processor_name()}, {os.cpu_count()} CPUs; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), OpenVINO {_openvino_version()}; PyTorch flavours on {_device_name(args)}"
    )
    print(
        f"eager fp32 output range: score {baseline['scores'].min():.4f}..{baseline['scores'].max():.4f}, "
        f"map {baseline['maps'].min():.4f}..{baseline['maps'].max():.4f}"
    )
    memory = "GPU MB" if args.device == "cuda" else "peak MB"
    header = f"{'flavour':<19}{'s/image':>9}{'images/s':>10}{'vs eager fp32':>15}{memory:>9}{'load s':>8}"
    print(header + f"{'max|d score|':>14}{'max|d map|':>12}")
    for row in rows:
        print(
            f"{row['flavour']:<19}{row['seconds_per_image']:>9.3g}{row['images_per_second']:>10.3g}"
            f"{row['speedup_vs_eager_fp32']:>14.2f}x{row['peak_mb']:>9.0f}{row['load_seconds']:>8.1f}"
            f"{row['max_abs_score_diff']:>14.2e}{row['max_abs_map_diff']:>12.2e}"
        )


def main(argv: list[str] | None = None) -> None:
    """Export, run every flavour in its own process, print the table."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.run_flavour:
        run_flavour(args, args.work_dir)
        return
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
            rows.append(summarise(name, result, results[BASELINE]))
            print(_progress_line(rows[-1]), flush=True)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=2))
        if BASELINE not in results:
            raise SystemExit("eager fp32 failed; no ratios to print.")
        print_table(rows, args, results[BASELINE])


def _progress_line(row: dict) -> str:
    return (
        f"{row['flavour']}: {row['seconds_per_image']:.3g} s/image, {row['speedup_vs_eager_fp32']:.2f}x eager fp32, "
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


def _max_difference(values: np.ndarray, reference: np.ndarray) -> float:
    """Largest absolute difference; NaN when there is nothing to compare (plain CLIP)."""
    return float(np.abs(values - reference).max()) if values.shape == reference.shape else float("nan")


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

"""Export to Torch, ONNX and OpenVINO: one graph from image to score and map, without the text encoder.

A tiny CLIP with 6 vision blocks (DPAM from block 3, maps from blocks 3 and 6) keeps the
exports to seconds; the graph has the same structure as for ViT-L/14@336.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from anomalib.deploy import OpenVINOInferencer, TorchInferencer
from anomalib.deploy.export import CompressionType
from anomalib.engine import Engine
from lightning.pytorch import Trainer

from anomalib_anomalyclip import AnomalyCLIP, ExportedAnomalyCLIP
from anomalib_anomalyclip.integration.export import ExportUnavailableError
from anomalib_anomalyclip.integration.exported_model import DEFAULT_OPENVINO_CONFIG
from anomalib_anomalyclip.integration.lightning_model import PromptsUnavailableError
from anomalib_anomalyclip.integration.prompt_plan import PromptState
from anomalib_anomalyclip.method.inference_model import AnomalyCLIPInferenceModel
from anomalib_anomalyclip.method.prompts import PromptConfig, PromptLearner, save_prompts
from anomalib_anomalyclip.testing.tiny_clip import TinyClipConfig, save_openai_state_dict
from anomalib_anomalyclip.testing.toy_data import make_mvtec_like_dataset

IMAGE_SIZE = 56
MODEL_ARGS = {"image_size": IMAGE_SIZE, "dpam_start_layer": 3, "feature_layers": [3, 6]}
TOLERANCE = 1e-3
VOCAB_SIZE = TinyClipConfig().vocab_size
OUTPUTS = ("pred_score", "anomaly_map")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export")
    make_mvtec_like_dataset(root / "data", categories=("alpha",), image_size=64, n_test_good=2, n_test_defect=2)
    return root


@pytest.fixture(scope="module")
def clip_path(workspace: Path) -> Path:
    return save_openai_state_dict(workspace / "clip.pt", TinyClipConfig(vision_layers=6), seed=0)


@pytest.fixture(scope="module")
def prompt_path(workspace: Path) -> Path:
    learner = PromptLearner(PromptConfig(width=TinyClipConfig().text_width), torch.Generator().manual_seed(5))
    return save_prompts(learner, workspace / "prompts.pt")


@pytest.fixture(scope="module")
def model(clip_path: Path, prompt_path: Path) -> AnomalyCLIP:
    return AnomalyCLIP(pretrained=str(clip_path), prompt_weights=str(prompt_path), **MODEL_ARGS).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Two images in [0, 1] of another size than the model's (the graph resizes them)."""
    return torch.rand(2, 3, 64, 72, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def eager(model: AnomalyCLIP, images: torch.Tensor) -> dict[str, np.ndarray]:
    with torch.inference_mode():
        outputs = model(images)
    return {name: getattr(outputs, name).numpy() for name in OUTPUTS}


@pytest.fixture(scope="module")
def checkpoint(workspace: Path, clip_path: Path, model: AnomalyCLIP) -> Path:
    """A Lightning checkpoint whose prompts exist only in the checkpoint (as after prompt training)."""
    trained = AnomalyCLIP(pretrained=str(clip_path), **MODEL_ARGS)
    trained.model.prompt_learner.load_state_dict(model.model.prompt_learner.state_dict())
    trained.prompt_state = PromptState.FIXED  # as after training
    trainer = Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", default_root_dir=workspace)
    trainer.strategy.connect(trained)
    path = workspace / "model.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def exported(workspace: Path, model: AnomalyCLIP, clip_path: Path, checkpoint: Path) -> dict[str, Path]:
    """One export per format: Torch and OpenVINO from the module, ONNX through ``Engine.export(ckpt_path=...)``."""
    root = workspace / "exports"
    fresh = AnomalyCLIP(pretrained=str(clip_path), **MODEL_ARGS)
    onnx_path = Engine(default_root_dir=root).export(fresh, "onnx", export_root=root, ckpt_path=checkpoint)
    return {"torch": model.to_torch(root), "onnx": onnx_path, "openvino": model.to_openvino(root)}


def _visual_bytes(model: AnomalyCLIP) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in model.model.visual_encoder.state_dict().values())


def _openvino_outputs(path: Path, images: torch.Tensor) -> dict[str, np.ndarray]:
    # f32 explicitly: on CPUs with native bf16, OpenVINO's default precision is bf16.
    inferencer = OpenVINOInferencer(path, device="CPU", config=DEFAULT_OPENVINO_CONFIG)
    raw = inferencer.model({inferencer.input_blob.any_name: images.numpy()})
    return inferencer.post_process(raw)


def _max_differences(outputs: dict[str, np.ndarray], eager: dict[str, np.ndarray]) -> dict[str, float]:
    return {
        name: float(np.abs(np.asarray(outputs[name]).reshape(eager[name].shape) - eager[name]).max())
        for name in OUTPUTS
    }


def test_export_needs_prompts(clip_path: Path, tmp_path: Path) -> None:
    untrained = AnomalyCLIP(pretrained=str(clip_path), **MODEL_ARGS)
    for export in (untrained.to_torch, untrained.to_onnx, untrained.to_openvino):
        with pytest.raises(PromptsUnavailableError, match="no trained prompts"):
            export(tmp_path)
    assert not list(tmp_path.rglob("*.*"))


def test_torch_export_holds_the_inference_path_only(
    exported: dict[str, Path], model: AnomalyCLIP, images: torch.Tensor, eager: dict[str, np.ndarray]
) -> None:
    saved = torch.load(exported["torch"], map_location="cpu", weights_only=False)["model"]
    assert isinstance(saved.model, AnomalyCLIPInferenceModel)
    assert not [key for key in saved.state_dict() if "text_encoder" in key or "prompt_learner" in key]
    assert exported["torch"].stat().st_size < 1.1 * _visual_bytes(model)
    assert isinstance(model.model.text_encoder, torch.nn.Module)  # the exported module is restored afterwards

    os.environ["TRUST_REMOTE_CODE"] = "1"  # TorchInferencer refuses to unpickle without it
    try:
        inferencer = TorchInferencer(exported["torch"], device="cpu")
    finally:
        del os.environ["TRUST_REMOTE_CODE"]
    with torch.inference_mode():
        outputs = inferencer.model(images)
    differences = _max_differences({name: getattr(outputs, name).numpy() for name in OUTPUTS}, eager)
    assert max(differences.values()) <= TOLERANCE, differences


def test_onnx_graph_has_no_text_encoder(exported: dict[str, Path], model: AnomalyCLIP) -> None:
    graph = onnx.load(str(exported["onnx"]))  # external weight data is read from beside the file
    shapes = [tuple(initializer.dims) for initializer in graph.graph.initializer]
    assert not [shape for shape in shapes if VOCAB_SIZE in shape]  # no token-embedding table
    weight_bytes = sum(onnx.numpy_helper.to_array(initializer).nbytes for initializer in graph.graph.initializer)
    assert 0.9 * _visual_bytes(model) < weight_bytes < 1.1 * _visual_bytes(model)
    assert {output.name for output in graph.graph.output} == {"pred_score", "pred_label", "anomaly_map", "pred_mask"}


@pytest.mark.parametrize("export_type", ["onnx", "openvino"])
def test_exported_graph_matches_eager(
    exported: dict[str, Path], images: torch.Tensor, eager: dict[str, np.ndarray], export_type: str
) -> None:
    outputs = _openvino_outputs(exported[export_type], images)
    differences = _max_differences(outputs, eager)
    assert max(differences.values()) <= TOLERANCE, differences
    assert outputs["anomaly_map"].shape == (2, 1, IMAGE_SIZE, IMAGE_SIZE)
    np.testing.assert_array_equal(outputs["pred_label"].reshape(-1), eager["pred_score"] > 0.5)


@pytest.mark.parametrize("export_type", ["onnx", "openvino"])
def test_exported_graph_resizes_a_1024_px_image_as_the_eager_loops(
    exported: dict[str, Path], model: AnomalyCLIP, export_type: str
) -> None:
    """The graph's antialiased resize (matrix products) against the Lightning loops' (8-bit kernel) one."""
    image = torch.randint(0, 256, (1, 3, 1024, 1024), generator=torch.Generator().manual_seed(3)) / 255
    with torch.inference_mode():
        loops = model.post_processor(model.model(model.pre_processor.transform(image)))
    eager_outputs = {name: getattr(loops, name).numpy() for name in OUTPUTS}
    differences = _max_differences(_openvino_outputs(exported[export_type], image), eager_outputs)
    assert max(differences.values()) <= TOLERANCE, differences


def test_openvino_weights_are_the_visual_encoder(exported: dict[str, Path], model: AnomalyCLIP) -> None:
    weights = exported["openvino"].with_suffix(".bin")
    assert 0.9 * _visual_bytes(model) < weights.stat().st_size < 1.1 * _visual_bytes(model)


@pytest.mark.parametrize("export_type", ["torch", "openvino"])
def test_predict_with_an_exported_model_writes_visualisations(
    exported: dict[str, Path], workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, export_type: str
) -> None:
    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")
    monkeypatch.chdir(tmp_path)  # OpenVINOInferencer writes an openvino_cache folder here
    folder = workspace / "data" / "alpha" / "test" / "blob"
    model = ExportedAnomalyCLIP(str(exported[export_type]), device="CPU" if export_type == "openvino" else "cpu")
    predictions = Engine(default_root_dir=tmp_path / "results").predict(model, data_path=folder)
    written = sorted((tmp_path / "results").rglob("*.png"))
    assert len(written) == len(list(folder.glob("*.png"))) == len(predictions)
    assert predictions[0].anomaly_map.shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE)


def test_exported_model_is_tested_with_the_metrics_of_the_eager_model(
    clip_path: Path, prompt_path: Path, exported: dict[str, Path], tmp_path: Path
) -> None:
    from anomalib.data import MVTecAD

    # Images at the model's input size: the export's plain resize then equals the eager anti-aliased one.
    make_mvtec_like_dataset(tmp_path / "data", categories=("alpha",), image_size=IMAGE_SIZE, n_test_good=3)

    def test(anomalib_model: object) -> dict[str, float]:
        datamodule = MVTecAD(root=tmp_path / "data", category="alpha", eval_batch_size=4, num_workers=0)
        engine = Engine(default_root_dir=tmp_path / "runs", accelerator="cpu", logger=False)
        (metrics,) = engine.test(anomalib_model, datamodule=datamodule, verbose=False)
        return metrics

    # A model of its own: testing sets its thresholds, which the module's shared model must keep.
    eager_metrics = test(AnomalyCLIP(pretrained=str(clip_path), prompt_weights=str(prompt_path), **MODEL_ARGS))
    exported_metrics = test(ExportedAnomalyCLIP(str(exported["openvino"]), visualizer=False))

    assert set(exported_metrics) == set(eager_metrics) >= {"image_AUROC", "pixel_AUROC", "pixel_AUPRO"}
    # The paper's AUPRO samples thresholds evenly between the smallest and largest map value, so unlike the others
    # it depends on the maps' scale: the eager model's maps are normalised piecewise linearly around the threshold
    # its validation found, the exported graph's around the export-time one (4e-4 apart here).
    paper = "pixel_AUPRO_paper"
    assert exported_metrics.pop(paper) == pytest.approx(eager_metrics.pop(paper), abs=1e-3)
    assert exported_metrics == pytest.approx(eager_metrics, abs=1e-4)


def test_exported_model_rejects_unknown_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ExportedAnomalyCLIP(str(tmp_path / "model.xml"))
    (tmp_path / "model.tflite").write_bytes(b"")
    with pytest.raises(ValueError, match="Unknown exported model type"):
        ExportedAnomalyCLIP(str(tmp_path / "model.tflite"))


@pytest.mark.parametrize("compression", [CompressionType.INT8_PTQ, CompressionType.INT8_ACQ])
def test_quantisation_without_data_fails_clearly(model: AnomalyCLIP, tmp_path: Path, compression: str) -> None:
    # ValueError is what anomalib raises for missing calibration data, so code written for anomalib catches ours.
    with pytest.raises(ValueError, match=r"calibrates on images from a datamodule.*--data") as error:
        model.to_openvino(tmp_path, compression_type=compression)
    assert isinstance(error.value, ExportUnavailableError)


def test_accuracy_controlled_quantisation_refuses_batches_of_one(
    model: AnomalyCLIP, workspace: Path, tmp_path: Path
) -> None:
    from anomalib.data import MVTecAD

    datamodule = MVTecAD(root=workspace / "data", category="alpha", eval_batch_size=1, num_workers=0)
    with pytest.raises(ValueError, match=r"eval_batch_size >= 2") as error:
        model.to_openvino(tmp_path, compression_type=CompressionType.INT8_ACQ, datamodule=datamodule)
    assert isinstance(error.value, ExportUnavailableError)
    assert not any(tmp_path.rglob("*.xml"))


@pytest.mark.slow
def test_openvino_compression(
    model: AnomalyCLIP, workspace: Path, images: torch.Tensor, eager: dict[str, np.ndarray]
) -> None:
    from anomalib.data import MVTecAD

    root = workspace / "compressed"
    fp16 = model.to_openvino(root, "fp16", compression_type=CompressionType.FP16)
    assert max(_max_differences(_openvino_outputs(fp16, images), eager).values()) <= 1e-2
    datamodule = MVTecAD(root=workspace / "data", category="alpha", eval_batch_size=1, num_workers=0)
    int8 = model.to_openvino(root, "int8_ptq", compression_type=CompressionType.INT8_PTQ, datamodule=datamodule)
    outputs = _openvino_outputs(int8, images)
    # Agreement of INT8 with fp32 is measured by benchmarks/inference.py (a tiny random CLIP says little about it).
    assert all(((outputs[name] >= 0) & (outputs[name] <= 1)).all() for name in OUTPUTS)
    assert outputs["anomaly_map"].shape == (2, 1, IMAGE_SIZE, IMAGE_SIZE)
    datamodule = MVTecAD(root=workspace / "data", category="alpha", eval_batch_size=2, num_workers=0)
    int8_acq = model.to_openvino(root, "int8_acq", compression_type=CompressionType.INT8_ACQ, datamodule=datamodule)
    assert _openvino_outputs(int8_acq, images)["anomaly_map"].shape == (2, 1, IMAGE_SIZE, IMAGE_SIZE)


@pytest.mark.slow
def test_cli_export_then_predict(workspace: Path, clip_path: Path, prompt_path: Path, tmp_path: Path) -> None:
    """``anomalib export`` of a zero-shot model, then ``anomalib predict`` on the exported file."""
    anomalib = Path(sys.executable).with_name("anomalib")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    model_args = [f"--model.{name}={value}" for name, value in MODEL_ARGS.items()]
    export = [
        "export", "--model", "AnomalyCLIP", "--model.pretrained", str(clip_path), *model_args,
        "--model.prompt_weights", str(prompt_path), "--export_type", "openvino", "--default_root_dir", "out",
    ]  # fmt: skip
    result = subprocess.run([str(anomalib), *export], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    xml = tmp_path / "out" / "weights" / "openvino" / "model.xml"
    folder = workspace / "data" / "alpha" / "test" / "good"
    predict = ["predict", "--model", "ExportedAnomalyCLIP", "--model.path", str(xml), "--data", str(folder)]
    result = subprocess.run(
        [str(anomalib), *predict, "--default_root_dir", "predicted"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((tmp_path / "predicted").rglob("*.png"))) == len(list(folder.glob("*.png")))


def test_bf16_hint_is_refused_on_cpus_without_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    import openvino

    from anomalib_anomalyclip.integration.exported_model import check_precision_hint

    class CoreWithoutBf16:
        def get_property(self, device: str, name: str) -> list[str]:
            return ["FP32", "INT8"]

    monkeypatch.setattr(openvino, "Core", CoreWithoutBf16)
    with pytest.raises(ValueError, match="no native bf16"):
        check_precision_hint("CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
    check_precision_hint("CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    check_precision_hint("CPU", None)


@pytest.mark.slow  # tens of seconds to minutes of CPU: the full suite runs it
def test_few_shot_exports_carry_the_bank_and_match_eager(
    workspace: Path, clip_path: Path, prompt_path: Path, images: torch.Tensor, tmp_path: Path
) -> None:
    references = workspace / "data" / "alpha" / "train" / "good"
    model = AnomalyCLIP(
        pretrained=str(clip_path),
        prompt_weights=str(prompt_path),
        k_shot=4,
        few_shot_source=str(references),
        **MODEL_ARGS,
    ).eval()
    model.collect_references(required=True)
    bank_rows = 4 * (IMAGE_SIZE // 14) ** 2
    assert model.model.few_shot.memory.shape[1] == bank_rows
    with torch.inference_mode():
        outputs = model(images)
    eager = {name: getattr(outputs, name).numpy() for name in OUTPUTS}
    zero_shot = AnomalyCLIP(pretrained=str(clip_path), prompt_weights=str(prompt_path), **MODEL_ARGS).eval()
    with torch.inference_mode():
        assert not np.allclose(zero_shot(images).pred_score.numpy(), eager["pred_score"], atol=1e-3)

    onnx_path = model.to_onnx(tmp_path)
    shapes = [tuple(initializer.dims) for initializer in onnx.load(str(onnx_path)).graph.initializer]
    assert not [shape for shape in shapes if VOCAB_SIZE in shape]  # no text encoder
    assert [shape for shape in shapes if bank_rows in shape]  # the bank is a constant
    for path in (onnx_path, model.to_openvino(tmp_path)):
        differences = _max_differences(_openvino_outputs(path, images), eager)
        assert max(differences.values()) <= TOLERANCE, (path.suffix, differences)
    saved = torch.load(model.to_torch(tmp_path), map_location="cpu", weights_only=False)["model"]
    assert not [key for key in saved.state_dict() if "text_encoder" in key or "prompt_learner" in key]
    with torch.inference_mode():
        differences = _max_differences({name: getattr(saved(images), name).numpy() for name in OUTPUTS}, eager)
    assert max(differences.values()) <= TOLERANCE, differences


def _one_by_one(run: Callable[[torch.Tensor], dict[str, np.ndarray]], images: torch.Tensor) -> dict[str, np.ndarray]:
    """``run`` on each image alone, the outputs stacked as one batch's."""
    singles = [run(image[None]) for image in images]
    return {name: np.concatenate([np.asarray(single[name]).reshape(1, -1) for single in singles]) for name in OUTPUTS}


def _flat(outputs: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    return {name: np.asarray(outputs[name]).reshape(batch_size, -1) for name in OUTPUTS}


@pytest.mark.parametrize("runner", ["eager", "openvino"])
def test_a_batch_of_eight_scores_as_eight_batches_of_one(
    model: AnomalyCLIP, exported: dict[str, Path], runner: str
) -> None:
    images = torch.rand(8, 3, 64, 72, generator=torch.Generator().manual_seed(8))

    def eager_run(batch: torch.Tensor) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            outputs = model(batch)
        return {name: getattr(outputs, name).numpy() for name in OUTPUTS}

    if runner == "eager":
        run = eager_run
    else:
        inferencer = OpenVINOInferencer(exported["openvino"], device="CPU", config=DEFAULT_OPENVINO_CONFIG)
        assert inferencer.model.inputs[0].get_partial_shape()[0].is_dynamic  # the graph takes any batch size

        def run(batch: torch.Tensor) -> dict[str, np.ndarray]:
            return inferencer.post_process(inferencer.model({inferencer.input_blob.any_name: batch.numpy()}))

    batched, single = _flat(run(images), 8), _one_by_one(run, images)
    for name in OUTPUTS:
        np.testing.assert_allclose(batched[name], single[name], rtol=0, atol=1e-5, err_msg=name)
    # And the same images as the eager model scores them (the export's own agreement, 1e-3, is tested above).
    assert max(_max_differences(batched, _flat(eager_run(images), 8)).values()) <= TOLERANCE

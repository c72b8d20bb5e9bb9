"""The page's batch scoring without a browser: model arguments, exported models, decisions, histogram.

Also anomalib's own ``tools/inference/gradio_inference.py`` with an exported AnomalyCLIP (docs/app.md): that script
is not installed with anomalib, so the test makes the calls it makes (an inferencer made from the file with its
defaults, ``predict`` on a PIL image, ``visualize_anomaly_map``/``visualize_mask`` overlaid on the image).
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from anomalib_anomalyclip.app.downloads import decision, write_overlay_zip, write_predictions_csv
from anomalib_anomalyclip.app.histogram import histogram_svg
from anomalib_anomalyclip.app.service import BatchRequest, BatchScorer, ModelArguments, ScoredImage
from anomalib_anomalyclip.testing import make_mvtec_like_dataset

IMAGE_SIZE = 56


def test_the_page_is_served_before_torch_is_imported() -> None:
    import subprocess
    import sys

    code = (
        "import sys, anomalib_anomalyclip.app.cli, anomalib_anomalyclip.app.page; "
        "print(','.join(m for m in ('torch', 'lightning', 'anomalib', 'gradio') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_model_arguments_are_those_of_anomalib_predict() -> None:
    zero_shot = ModelArguments(("--model.prompt_weights", "anomalyclip-mvtec", "--model.image_size", "336"))
    assert zero_shot.predict_words()[:3] == ["predict", "--model", "AnomalyCLIP"]
    assert not zero_shot.exported
    exported = ModelArguments(("--model", "ExportedAnomalyCLIP", "--model.path", "model.xml"))
    assert exported.exported
    assert exported.predict_words() == ["predict", "--model", "ExportedAnomalyCLIP", "--model.path", "model.xml"]


def test_decisions_follow_the_threshold_with_the_models_margin(tmp_path: Path) -> None:
    assert decision(0.5, 0.5) == "normal"
    assert decision(0.50002, 0.5) == "anomalous"
    assert decision(0.3, 0.2) == "anomalous"
    overlay = tmp_path / "a.png"
    Image.new("RGB", (4, 4)).save(overlay)
    images = [ScoredImage("a.png", tmp_path / "a.png", 0.7, "anomalous", overlay)]
    with write_predictions_csv(images, 0.8, tmp_path / "out").open() as file:
        rows = list(csv.DictReader(file))
    assert rows == [{"path": str(tmp_path / "a.png"), "score": "0.700000", "decision": "normal"}]
    assert write_overlay_zip(images, tmp_path / "out").stat().st_size > 0


def test_histogram_draws_the_threshold_and_colours_the_bins() -> None:
    svg = histogram_svg([0.1, 0.15, 0.9], 0.5, bins=10)
    assert "threshold 0.500" in svg
    assert svg.count('fill="#d62728"') == 5  # bins above the threshold
    assert "0.10-0.20: 2" in svg


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six generated images in ``images/`` and a prompt file."""
    from anomalib_anomalyclip.method.prompts import PromptConfig, PromptLearner, save_prompts

    root = tmp_path_factory.mktemp("app_service")
    dataset = make_mvtec_like_dataset(root / "toy", categories=["alpha"], n_test_good=4, n_test_defect=2, seed=5)
    (root / "images").mkdir()
    for path in sorted((dataset / "alpha" / "test").rglob("*.png")):
        shutil.copy(path, root / "images" / f"{path.parent.name}_{path.name}")
    torch.manual_seed(0)
    save_prompts(PromptLearner(PromptConfig(width=64)), root / "prompts.pt")
    return root


@pytest.fixture(scope="module")
def exports(workspace: Path, tiny_clip_path: Path) -> dict[str, Path]:
    """The tiny model exported for Torch and OpenVINO."""
    from anomalib_anomalyclip import AnomalyCLIP

    model = AnomalyCLIP(pretrained=str(tiny_clip_path), prompt_weights=str(workspace / "prompts.pt"), image_size=56)
    model.eval()
    root = workspace / "exports"
    return {"torch": model.to_torch(root), "openvino": model.to_openvino(root)}


def _model_words(tiny_clip_path: Path, workspace: Path) -> tuple[str, ...]:
    return (
        "--model.pretrained", str(tiny_clip_path), "--model.prompt_weights", str(workspace / "prompts.pt"),
        "--model.image_size", str(IMAGE_SIZE),
    )  # fmt: skip


def test_tiling_switch_tiles_with_the_models_input_size(workspace: Path, tiny_clip_path: Path) -> None:
    images = sorted((workspace / "images").glob("*.png"))
    scorer = BatchScorer(ModelArguments(_model_words(tiny_clip_path, workspace)), workspace / "work_tiling")
    scorer.check()
    untiled = {image.name: image.score for image in scorer.score(BatchRequest(images)).images}
    result = scorer.score(BatchRequest(images, tiling=True))
    assert not result.error
    saved = yaml.safe_load((result.folder / "config.yaml").read_text())["model"]["init_args"]["tiling"]
    assert saved["enabled"] and saved["tile_size"] is None  # tiles of the model's input size
    tiled = {image.name: image.score for image in result.images}
    assert tiled.keys() == untiled.keys()
    assert tiled != untiled


@pytest.mark.slow
def test_an_exported_model_scores_the_batch_like_the_model(
    workspace: Path, exports: dict[str, Path], tiny_clip_path: Path
) -> None:
    images = sorted((workspace / "images").glob("*.png"))
    model = BatchScorer(ModelArguments(_model_words(tiny_clip_path, workspace)), workspace / "work_model")
    exported_words = ("--model", "ExportedAnomalyCLIP", "--model.path", str(exports["openvino"]))
    exported = BatchScorer(ModelArguments(exported_words), workspace / "work_exported")
    by_model = {image.name: image.score for image in model.score(BatchRequest(images)).images}
    result = exported.score(BatchRequest(images))
    assert not result.error
    assert {image.name: pytest.approx(image.score, abs=1e-4) for image in result.images} == by_model

    refused = exported.score(BatchRequest(images, references=images[:2]))
    assert refused.images == []
    assert "An exported model is fixed when it is exported" in refused.error
    not_mutual = exported.score(BatchRequest(images, mutual=True))
    assert not_mutual.images == []
    assert "has no outputs for mutual scoring" in not_mutual.error


@pytest.mark.slow
def test_anomalib_gradio_tool_calls_work_with_an_exported_model(
    workspace: Path, exports: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from anomalib.deploy import OpenVINOInferencer, TorchInferencer
    from anomalib.visualization.image.functional import overlay_image, visualize_anomaly_map, visualize_mask

    from anomalib_anomalyclip.integration.exported_model import ExportedGraph

    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")  # the tool's TorchInferencer unpickles the .pt file
    image = Image.open(sorted((workspace / "images").glob("*.png"))[0]).convert("RGB")
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    for kind, inferencer in (
        ("torch", TorchInferencer(path=exports["torch"])),
        ("openvino", OpenVINOInferencer(path=exports["openvino"])),
    ):
        predictions = inferencer.predict(image=image)
        heat_map = overlay_image(base=image, overlay=visualize_anomaly_map(predictions.anomaly_map))
        segmentation = overlay_image(base=image, overlay=visualize_mask(predictions.pred_mask, mode="contour"))
        assert heat_map.size == segmentation.size == image.size
        expected = float(ExportedGraph(exports[kind], device="cpu" if kind == "torch" else "CPU")(pixels).pred_score)
        score = float(np.asarray(predictions.pred_score).reshape(-1)[0])
        # OpenVINO's default precision is bf16 on CPUs that have it: the tool's scores then move by up to 1e-2.
        assert score == pytest.approx(expected, abs=1e-6 if kind == "torch" else 2e-2), kind


@pytest.mark.slow
def test_wrong_model_arguments_stop_the_app_with_the_packages_message(tmp_path: Path, tiny_clip_path: Path) -> None:
    import subprocess
    import sys

    from test_cli_end_to_end import _free_local_port

    port = str(_free_local_port())
    command = [sys.executable, "-m", "anomalib_anomalyclip.app.cli", "--port", port, "--workdir", str(tmp_path)]
    command += ["--model.pretrained", str(tiny_clip_path), "--model.prompt_weights", "missing.pt"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "ERROR: AnomalyCLIP cannot start" in result.stderr
    assert "no file 'missing.pt'" in result.stderr
    assert "Traceback" not in result.stderr

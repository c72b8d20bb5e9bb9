"""The README's "Your own images" and "Bad input" commands, through the real ``anomalib`` command line.

The released prompts and CLIP weights are replaced by a prompt file and a tiny random CLIP (no network).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli_end_to_end import anomalib_cli

from anomalib_anomalyclip.method.prompts import PromptConfig, PromptLearner, save_prompts

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep rich from wrapping messages at 80 columns in the captured output."""
    monkeypatch.setenv("COLUMNS", "400")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working folder with ``my_images/`` (8-bit, 16-bit, RGBA, non-square) and ``prompts.pt``."""
    root = tmp_path_factory.mktemp("cli_own_images")
    folder = root / "my_images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "part_1.png")
    Image.fromarray(rgb[..., 1].astype(np.uint16) * 257).save(folder / "part_2_16bit.png")
    Image.fromarray(np.dstack([rgb, np.full((40, 60), 100, np.uint8)])).save(folder / "part_3_rgba.png")
    torch.manual_seed(0)
    save_prompts(PromptLearner(PromptConfig(width=64)), root / "prompts.pt")
    return root


def _predict(tiny_clip_path: Path, *args: str, cwd: Path, check: bool = True) -> str:
    result = anomalib_cli(
        "predict", "--model", "AnomalyCLIP", "--model.pretrained", str(tiny_clip_path), "--model.image_size", "56",
        *args, cwd=cwd, check=check,
    )  # fmt: skip
    if not check:
        assert result.returncode != 0
    return result.stdout + result.stderr


def test_predict_folder_writes_overlays_and_a_csv(workspace: Path, tiny_clip_path: Path) -> None:
    _predict(
        tiny_clip_path, "--model.prompt_weights", "prompts.pt",
        "--data", "anomalib_anomalyclip.data.PredictFolder", "--data.path", "./my_images", cwd=workspace,
    )  # fmt: skip
    run = workspace / "results" / "AnomalyCLIP" / "PredictFolder" / "my_images" / "latest"
    with (run / "predictions.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    images = sorted((workspace / "my_images").glob("*.png"))
    assert [row["path"] for row in rows] == [str(path) for path in images]
    for row in rows:
        assert 0.0 <= float(row["score"]) <= 1.0
        assert row["decision"] == ("anomalous" if float(row["score"]) > 0.5 else "normal")
    assert sorted(path.name for path in (run / "images").rglob("*.png")) == [path.name for path in images]


def test_plain_folder_refuses_16_bit_and_transparent_images(workspace: Path, tiny_clip_path: Path) -> None:
    output = _predict(
        tiny_clip_path, "--model.prompt_weights", "prompts.pt", "--data", "./my_images", cwd=workspace, check=False
    )
    assert "ERROR: 2 of 3 images of PredictDataset cannot be used" in output
    assert "part_2_16bit.png: 16-bit grayscale" in output
    assert "--data anomalib_anomalyclip.data.PredictFolder --data.path <folder>" in output


def test_setup_errors_are_stated_on_their_own_line(workspace: Path, tiny_clip_path: Path) -> None:
    output = _predict(
        tiny_clip_path, "--model.prompt_weights", "prompts.pt", "--model.n_ctx", "8", "--data", "./my_images",
        cwd=workspace, check=False,
    )  # fmt: skip
    expected = "ERROR: Prompt checkpoint prompts.pt does not fit this model: it has n_ctx=12 context vectors"
    assert re.search(rf"^{re.escape(expected)}.*$", output, re.MULTILINE)
    assert output.count("does not fit this model") == 1  # printed once, not in three reports

    output = _predict(
        tiny_clip_path, "--model.pretrained", "openai", "--model.prompt_weights", "prompts.pt",
        "--data", "./my_images", cwd=workspace, check=False,
    )  # fmt: skip
    missing_clip = r"(?s)ERROR: AnomalyCLIP cannot start.*the CLIP weights of ViT-L-14-336.*--model\.pretrained"
    assert re.search(missing_clip, output)

"""The real ``anomalib`` command line: tiling by anomalib's TilerConfigurationCallback or by the model's arguments.

Both runs of ``anomalib predict`` score the same generated images (336 px, small defects) with the same tiny CLIP and
prompts, tiled into 56 px tiles every 42 px at a 168 px working size; the callback run takes the working size from
``--model.tile_working_size`` and switches tiling on through ``--trainer.callbacks``. They must write the same scores
and the same overlays (drawn from the maps).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalib_anomalyclip.testing.small_defects import make_small_defect_dataset
from anomalib_anomalyclip.testing.tiny_clip import TinyClipConfig, save_openai_state_dict

pytestmark = pytest.mark.slow

CATEGORY = "small_texture"
REPOSITORY = Path(__file__).resolve().parents[1]
MODEL = ["--model", "AnomalyCLIP", "--model.image_size", "56", "--model.dpam_start_layer", "3"]
WORKING = ["--model.tile_working_size", "168"]
BY_ARGUMENTS = ["--model.tile_size", "56", "--model.tile_stride", "42"]
BY_CALLBACK = [
    "--trainer.callbacks+=anomalib.callbacks.TilerConfigurationCallback",
    "--trainer.callbacks.enable", "true",
    "--trainer.callbacks.tile_size", "56",
    "--trainer.callbacks.stride", "42",
]  # fmt: skip


def _predict(workspace: Path, name: str, *extra: str) -> Path:
    """``anomalib predict`` in a fresh process; returns the run's results folder."""
    executable = Path(sys.executable).with_name("anomalib")
    arguments = [
        str(executable), "predict", *MODEL, "--model.pretrained", "clip.pt", "--model.prompt_weights", "prompts.pt",
        *WORKING, *extra, "--data", "MVTecAD", "--data.root", "data", "--data.category", CATEGORY,
        "--data.num_workers", "0", "--trainer.accelerator", "cpu", "--default_root_dir", name,
    ]  # fmt: skip
    path = os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))  # this checkout's package
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": path}
    result = subprocess.run(arguments, cwd=workspace, capture_output=True, text=True, env=env, timeout=900)
    if result.returncode != 0:
        pytest.fail(f"anomalib predict failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    assert "tiles 56-px tiles every 42 px at 168x168" in result.stdout + result.stderr
    (csv_path,) = (workspace / name).rglob("predictions.csv")
    return csv_path.parent


def _scores(folder: Path) -> dict[str, float]:
    with (folder / "predictions.csv").open() as file:
        return {row["path"]: float(row["score"]) for row in csv.DictReader(file)}


def test_tiler_callback_on_the_cli_and_model_arguments_give_the_same_maps(
    tmp_path: Path, tiny_prompt_path: Path
) -> None:
    make_small_defect_dataset(
        tmp_path / "data", {CATEGORY: "texture"}, image_size=336, n_train_good=0, n_test_good=2, n_test_defect=2,
        defect_size=(3.0, 6.0),
    )  # fmt: skip
    save_openai_state_dict(tmp_path / "clip.pt", TinyClipConfig(vision_layers=6))
    (tmp_path / "prompts.pt").write_bytes(tiny_prompt_path.read_bytes())

    by_callback = _predict(tmp_path, "callback", *BY_CALLBACK)
    by_arguments = _predict(tmp_path, "arguments", *BY_ARGUMENTS)

    assert _scores(by_callback) == pytest.approx(_scores(by_arguments), abs=1e-6)
    overlays = sorted(path.relative_to(by_callback) for path in by_callback.rglob("images/*/*.png"))
    assert len(overlays) == 4
    for overlay in overlays:
        first, second = (np.asarray(Image.open(folder / overlay)) for folder in (by_callback, by_arguments))
        assert np.array_equal(first, second), overlay

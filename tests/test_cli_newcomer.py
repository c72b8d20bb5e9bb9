"""A newcomer's first hour through the real ``anomalib`` command (tiny CLIP, generated data, one working folder).

* ``test`` (zero-shot) then ``train --model.k_shot 4`` on the same category: both exit 0 and the first run's files
  are still there, unchanged; ``fit``/``train`` say where the checkpoint went; two ``predict`` runs write to two
  folders;
* a zero-shot ``test`` prints no library warning, deprecation, tip or accelerator line, 30 lines at most;
* a mistyped model argument and ``ExportedAnomalyCLIP`` without its file: one ``ERROR`` line that says what to do.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from anomalib_anomalyclip.testing.toy_data import make_mvtec_like_dataset

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
NOISE = re.compile(
    r"warning|deprecat|tip|litlogger|GPU available|TPU available|will override|Overriding|ckpt_path is not provided",
    re.IGNORECASE,
)


def anomalib(*args: str, cwd: Path) -> tuple[int, list[str]]:
    """Run the ``anomalib`` command of this checkout (its start-up hook included); exit status and output lines."""
    executable = Path(sys.executable).with_name("anomalib")
    path = os.pathsep.join([str(REPO / "hooks"), str(REPO)])
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHONWARNINGS", "ANOMALYCLIP_"))}
    result = subprocess.run(
        [str(executable), *args], cwd=cwd, capture_output=True, text=True, env={**env, "PYTHONPATH": path}, timeout=600
    )
    return result.returncode, (result.stdout + result.stderr).splitlines()


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("newcomer")
    make_mvtec_like_dataset(root / "data", categories=("alpha",), image_size=64, n_train_good=4, n_test_good=3)
    return root


def _model_args(tiny_clip_path: Path, tiny_prompt_path: Path) -> list[str]:
    return ["--model", "AnomalyCLIP", "--model.pretrained", str(tiny_clip_path), "--model.image_size", "56",
            "--model.prompt_weights", str(tiny_prompt_path)]  # fmt: skip


def test_test_then_train_on_one_category_keeps_both_runs(folder: Path, tiny_clip_path, tiny_prompt_path) -> None:
    data = ["--data", "MVTecAD", "--data.root", "data", "--data.category", "alpha", "--data.num_workers", "0"]
    model = _model_args(tiny_clip_path, tiny_prompt_path)
    status, lines = anomalib("test", *model, *data, cwd=folder)
    assert status == 0, "\n".join(lines[-30:])
    assert [line for line in lines if NOISE.search(line)] == []
    assert len(lines) <= 30, "\n".join(lines)
    assert any("image_AUROC" in line for line in lines)  # the metrics table

    runs = folder / "results" / "AnomalyCLIP" / "MVTecAD" / "alpha"
    (first,) = [path for path in runs.iterdir() if not path.is_symlink()]
    before = _digests(first)
    assert "config.yaml" in before

    status, lines = anomalib("train", *model, "--model.k_shot", "4", *data, cwd=folder)
    assert status == 0, "\n".join(lines[-30:])
    assert _digests(first) == before  # the test run's files survive, unchanged
    (second,) = [path for path in runs.iterdir() if not path.is_symlink() and path != first]
    (said,) = [line.split("Checkpoint written to ")[1] for line in lines if "Checkpoint written to " in line]
    assert Path(said).is_file() and Path(said).is_relative_to(second)
    assert (runs / "latest").resolve() == second.resolve()


def test_two_predict_runs_write_two_folders(folder: Path, tiny_clip_path, tiny_prompt_path) -> None:
    tables = []
    for name in ("first", "second"):
        images = folder / name
        images.mkdir()
        for source in sorted((folder / "data" / "alpha" / "test" / "good").glob("*.png"))[: len(tables) + 1]:
            (images / source.name).write_bytes(source.read_bytes())
        status, lines = anomalib("predict", *_model_args(tiny_clip_path, tiny_prompt_path), "--data", name, cwd=folder)
        assert status == 0, "\n".join(lines[-30:])
        assert [line for line in lines if NOISE.search(line)] == []
        tables = sorted((folder / "results" / "AnomalyCLIP").glob("v*/predictions.csv"))
    assert [len(table.read_text().splitlines()) for table in tables] == [2, 3]  # a header and one row per image


def test_a_mistyped_model_argument_names_the_right_one(folder: Path) -> None:
    status, lines = anomalib("test", "--model", "AnomalyCLIP", "--model.mutual_scorng", "true", cwd=folder)
    assert status != 0 and len(lines) <= 15, "\n".join(lines)
    (error,) = [line for line in lines if line.startswith("ERROR")]
    assert "--model.mutual_scoring" in error


def test_an_exported_model_without_its_file_says_which_option_gives_it(folder: Path) -> None:
    status, lines = anomalib("predict", "--model", "ExportedAnomalyCLIP", "--data", "data", cwd=folder)
    assert status == 1 and len(lines) <= 15, "\n".join(lines)
    (error,) = [line for line in lines if line.startswith("ERROR")]
    assert "--model.path" in error

"""First runs and everyday use of ``anomalib ... --model AnomalyCLIP``: one message, quiet logs, stored CLIP.

* the README's main job, offline with nothing present: one message naming the prompts, the CLIP weights and the
  dataset, printed once, in a few seconds;
* a checkpoint made with a CLIP file brings it: ``predict`` and ``export`` with only ``--ckpt_path`` (fresh
  processes) score as the training process did; a moved CLIP file is named; an export prints a few lines;
  ``ExportedAnomalyCLIP`` writes the same ``predictions.csv`` as the eager model;
* files that are not checkpoints stop with one message naming them, and nothing in them runs.
"""

from __future__ import annotations

import csv
import os
import pickle
import resource
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from anomalib.data import MVTecAD
from anomalib.engine import Engine

from anomalib_anomalyclip import AnomalyCLIP, ExportedAnomalyCLIP
from anomalib_anomalyclip.testing import TinyClipConfig, save_openai_state_dict
from anomalib_anomalyclip.testing.toy_data import make_mvtec_like_dataset

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CATEGORY = "alpha"


def _anomalib(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    """The installed ``anomalib`` command in a fresh process, importing this checkout; result and CPU seconds.

    CPU seconds (user + system of the process) rather than wall time: shared test machines run other work.
    """
    executable = Path(sys.executable).with_name("anomalib")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run([str(executable), *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return result, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _read_csv(path: Path) -> tuple[list[str], dict[str, tuple[float, str]]]:
    with path.open() as file:
        reader = csv.DictReader(file)
        rows = {Path(row["path"]).name: (float(row["score"]), row["decision"]) for row in reader}
        return list(reader.fieldnames or []), rows


def test_main_job_offline_with_nothing_present_names_everything_once(tmp_path: Path) -> None:
    """The README's main command on a fresh machine without network: one short message, all three things."""
    config = REPO / "configs" / "zero_shot_visa.yaml"
    result, seconds = _anomalib("test", "--config", str(config), "--data.category", "candle", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert output.count("AnomalyCLIP cannot start") == 1, output
    assert "3 things are missing" in output
    assert "--model.prompt_weights" in output and "anomalyclip-mvtec" in output  # the prompts
    assert "--model.pretrained" in output and "ViT-L-14-336px.pt" in output  # the CLIP weights
    assert "datasets/visa" in output and "--data.root" in output and "split_csv" in output  # the dataset
    assert "Traceback" not in output and "Union subtypes" not in output
    assert len(output.splitlines()) < 40, output
    assert seconds < 15
    assert not (tmp_path / "datasets").exists()  # no download was started


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, tiny_prompt_path: Path) -> dict[str, Path]:
    """A tiny CLIP file (6 blocks: quick to export), toy data, and a checkpoint written by ``Engine.train``."""
    root = tmp_path_factory.mktemp("first_run")
    clip = save_openai_state_dict(root / "clip.pt", TinyClipConfig(vision_layers=6), seed=0)
    make_mvtec_like_dataset(root / "data", categories=(CATEGORY,), image_size=64, n_train_good=2, n_test_good=3)
    model = AnomalyCLIP(pretrained=str(clip), image_size=56, prompt_weights=str(tiny_prompt_path))
    datamodule = MVTecAD(root=root / "data", category=CATEGORY, num_workers=0)
    Engine(default_root_dir=root / "train", logger=False, accelerator="cpu").train(model, datamodule=datamodule)
    (checkpoint,) = (root / "train").rglob("model.ckpt")
    folder = root / "data" / CATEGORY / "test"
    Engine(default_root_dir=root / "eager", logger=False, accelerator="cpu").predict(model, data_path=folder)
    (table,) = (root / "eager").rglob("predictions.csv")
    return {"root": root, "clip": clip, "checkpoint": checkpoint, "folder": folder, "eager": table}


def test_checkpoint_brings_its_clip_to_predict_and_export(workspace: dict[str, Path], capsys) -> None:
    root, checkpoint = workspace["root"], str(workspace["checkpoint"])
    stored = torch.load(checkpoint, map_location="cpu", weights_only=True)["anomalyclip"]
    assert stored["clip"]["pretrained"] == str(workspace["clip"].resolve()) and stored["image_size"] == 56
    assert len(stored["clip"]["sha256"]) == 64

    folder = str(workspace["folder"])
    result, _ = _anomalib("predict", "--model", "AnomalyCLIP", "--ckpt_path", checkpoint, "--data", folder,
                          "--default_root_dir", "predicted", cwd=root)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (table,) = (root / "predicted").rglob("predictions.csv")
    columns, rows = _read_csv(table)
    eager_columns, eager = _read_csv(workspace["eager"])
    assert columns == eager_columns and rows.keys() == eager.keys()
    for name, (score, decision) in rows.items():
        assert abs(score - eager[name][0]) <= 1e-6 and decision == eager[name][1]
    (config,) = (root / "predicted").rglob("config.yaml")
    init_args = yaml.safe_load(config.read_text())["model"]["init_args"]
    assert init_args["image_size"] == 56 and init_args["pretrained"] == str(workspace["clip"].resolve())

    result, _ = _anomalib("export", "--model", "AnomalyCLIP", "--ckpt_path", checkpoint, "--export_type", "openvino",
                          "--default_root_dir", "exported", cwd=root)  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert len(output.splitlines()) < 60, output
    (xml,) = (root / "exported").rglob("model.xml")
    assert str(xml.relative_to(root)) in output.replace(str(root) + "/", "")  # where the files went

    engine = Engine(default_root_dir=root / "from_export", logger=False, accelerator="cpu")
    engine.predict(ExportedAnomalyCLIP(str(xml)), data_path=folder)
    (exported_table,) = (root / "from_export").rglob("predictions.csv")
    exported_columns, exported = _read_csv(exported_table)
    assert exported_columns == eager_columns and exported.keys() == eager.keys()
    for name, (score, decision) in exported.items():
        assert abs(score - eager[name][0]) <= 1e-5 and decision == eager[name][1]


def test_a_moved_clip_file_is_named_with_the_option_to_give_it(workspace: dict[str, Path], capsys) -> None:
    from anomalib.cli import AnomalibCLI

    clip, moved = workspace["clip"], workspace["root"] / "elsewhere.pt"
    clip.rename(moved)
    try:
        with pytest.raises(SystemExit) as stopped:
            AnomalibCLI(["predict", "--model", "AnomalyCLIP", "--ckpt_path", str(workspace["checkpoint"]),
                         "--data", str(workspace["folder"])], run=False)  # fmt: skip
    finally:
        moved.rename(clip)
    message = capsys.readouterr().err
    assert stopped.value.code == 1
    assert f"was made with '{clip.resolve()}', which is not there any more" in message
    assert "--model.pretrained" in message and message.count("CLIP weights") == 1


class _RunsCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def _hostile_files(folder: Path, marker: Path) -> dict[str, Path]:
    folder.mkdir()
    files = {
        "sentence": "This is where the model should be.\n",
        "html": "<!DOCTYPE html><html><body>404 Not Found</body></html>\n",
        "note starting with c": "checkpoint moved to the shared drive\n",
    }
    paths = {name: folder / f"{index}.ckpt" for index, name in enumerate([*files, "bytes", "zip", "pickle", "torch"])}
    for name, text in files.items():
        paths[name].write_text(text)
    paths["bytes"].write_bytes(bytes(range(256)) * 4)
    with zipfile.ZipFile(paths["zip"], "w") as archive:
        archive.writestr("readme.txt", "not a model")
    paths["pickle"].write_bytes(pickle.dumps(_RunsCommand(marker), protocol=2))
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2.6", "x": _RunsCommand(marker)}, paths["torch"])
    return paths


def test_files_that_are_not_checkpoints_stop_with_one_message(tmp_path: Path, workspace: dict[str, Path], capsys):
    from anomalib.cli import AnomalibCLI

    marker = tmp_path / "executed"
    for name, path in _hostile_files(tmp_path / "files", marker).items():
        with pytest.raises(SystemExit) as stopped:
            AnomalibCLI(["predict", "--model", "AnomalyCLIP", "--ckpt_path", str(path),
                         "--data", str(workspace["folder"])], run=False)  # fmt: skip
        captured = capsys.readouterr()
        output = captured.out + captured.err
        assert stopped.value.code == 1, name
        assert output.count(f"Cannot read '{path}' as a checkpoint") == 1, (name, output)
        assert "Expected a Lightning checkpoint of AnomalyCLIP" in output
        assert "Traceback" not in output and "torch.serialization" not in output and "pickle.py" not in output
    assert not marker.exists()

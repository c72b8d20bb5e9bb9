"""The real ``anomalib`` command line, in fresh processes, on generated MVTec-format data.

Exercises the short model name (``--model AnomalyCLIP`` resolves only through the import
hook installed with the package), prompt training on the auxiliary datamodule, zero-shot
testing on a held-out category with the checkpoint, prediction, and DDP training and prediction.
"""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from anomalib_anomalyclip.method.prompts import PromptConfig, PromptLearner, save_prompts
from anomalib_anomalyclip.testing.toy_data import make_mvtec_like_dataset

pytestmark = pytest.mark.slow

IMAGE_SIZE = "56"
TRAIN_CATEGORIES = "[alpha, beta, gamma]"
HELD_OUT = "delta"


def _free_local_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def anomalib_cli(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run the installed ``anomalib`` console script."""
    executable = Path(sys.executable).with_name("anomalib")
    # A port of its own, so that DDP runs of concurrent test sessions never meet.
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_local_port())}
    result = subprocess.run([str(executable), *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=900)
    if check and result.returncode != 0:
        pytest.fail(f"anomalib {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def _model_args(tiny_clip_path: Path) -> list[str]:
    return ["--model", "AnomalyCLIP", "--model.pretrained", str(tiny_clip_path), "--model.image_size", IMAGE_SIZE]


def _read_metrics(log_dir: Path) -> list[dict[str, str]]:
    (metrics,) = log_dir.rglob("metrics.csv")
    with metrics.open() as file:
        return list(csv.DictReader(file))


def _csv_logger(save_dir: Path) -> list[str]:
    return ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(save_dir)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    make_mvtec_like_dataset(
        root / "data", categories=("alpha", "beta", "gamma", HELD_OUT), image_size=64, n_test_good=6, n_test_defect=6
    )
    return root


@pytest.fixture(scope="module")
def trained(workspace: Path, tiny_clip_path: Path) -> dict[str, Path]:
    """``anomalib fit`` on the auxiliary datamodule over the three training categories."""
    anomalib_cli(
        "fit",
        *_model_args(tiny_clip_path),
        "--model.epochs", "8",
        "--data", "anomalib_anomalyclip.data.AuxiliaryDataModule",
        "--data.sources", f"[{{format: mvtec, root: data, categories: {TRAIN_CATEGORIES}}}]",
        "--data.num_workers", "0",
        "--trainer.accelerator", "cpu",
        *_csv_logger(workspace / "fit_logs"),
        "--default_root_dir", "fit",
        cwd=workspace,
    )  # fmt: skip
    (checkpoint,) = (workspace / "fit").rglob("model.ckpt")
    return {"checkpoint": checkpoint, "logs": workspace / "fit_logs"}


def _test_held_out(
    workspace: Path, tiny_clip_path: Path, name: str, *extra: str, subcommand: str = "test"
) -> dict[str, float]:
    anomalib_cli(
        subcommand,
        *_model_args(tiny_clip_path),
        *extra,
        "--data", "MVTecAD",
        "--data.root", "data",
        "--data.category", HELD_OUT,
        "--data.num_workers", "0",
        "--trainer.accelerator", "cpu",
        *_csv_logger(workspace / name),
        "--default_root_dir", name,
        cwd=workspace,
    )  # fmt: skip
    (row,) = [row for row in _read_metrics(workspace / name) if row.get("image_AUROC")]
    return {key: float(value) for key, value in row.items() if value}


def test_fit_learns_and_writes_a_small_checkpoint(trained: dict[str, Path]) -> None:
    losses = [float(row["train_loss"]) for row in _read_metrics(trained["logs"]) if row.get("train_loss")]
    assert len(losses) == 8
    assert losses[-1] < 0.9 * losses[0]
    assert trained["checkpoint"].stat().st_size < 1_000_000  # prompts only, not the CLIP weights
    state = torch.load(trained["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    assert any(key.startswith("model.prompt_learner.") for key in state)


@pytest.fixture(scope="module")
def trained_metrics(workspace: Path, tiny_clip_path: Path, trained: dict[str, Path]) -> dict[str, float]:
    """``anomalib test --ckpt_path`` on the held-out category."""
    return _test_held_out(workspace, tiny_clip_path, "test_trained", "--ckpt_path", str(trained["checkpoint"]))


def test_trained_prompts_beat_untrained_ones_on_a_held_out_category(
    workspace: Path, tiny_clip_path: Path, trained_metrics: dict[str, float]
) -> None:
    for key in ("image_AUROC", "image_AUPR", "pixel_AUROC", "pixel_AUPRO"):
        assert 0 <= trained_metrics[key] <= 1, key

    torch.manual_seed(111)
    untrained = save_prompts(PromptLearner(PromptConfig(width=64)), workspace / "untrained.pt")
    untrained_metrics = _test_held_out(
        workspace, tiny_clip_path, "test_untrained", "--model.prompt_weights", str(untrained)
    )
    gain = max(
        trained_metrics["image_AUROC"] - untrained_metrics["image_AUROC"],
        trained_metrics["pixel_AUROC"] - untrained_metrics["pixel_AUROC"],
    )
    assert gain > 0.1, (trained_metrics, untrained_metrics)


def test_checkpoint_also_loads_as_prompt_weights(
    workspace: Path, tiny_clip_path: Path, trained: dict[str, Path], trained_metrics: dict[str, float]
) -> None:
    checkpoint = str(trained["checkpoint"])
    # `train` with prompts given is anomalib's zero-shot path: no fitting, validation then test.
    metrics = _test_held_out(
        workspace, tiny_clip_path, "train_prompt_weights", "--model.prompt_weights", checkpoint, subcommand="train"
    )
    # Thresholds differ (validated on the target instead of the auxiliary data); rankings do not.
    for key in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO"):
        assert metrics[key] == pytest.approx(trained_metrics[key], abs=1e-4), key


def _read_predictions(root: Path) -> dict[str, dict[str, str]]:
    """The one ``predictions.csv`` under ``root``, keyed by file name."""
    (table,) = root.rglob("predictions.csv")  # path, score, decision per image
    with table.open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert len({row["path"] for row in rows}) == len(rows)
    return {Path(row["path"]).name: row for row in rows}


@pytest.fixture(scope="module")
def single_process_predictions(workspace: Path, tiny_clip_path: Path, trained: dict[str, Path]) -> Path:
    """``anomalib predict`` in one process on a folder of defect images; the results folder."""
    folder = workspace / "data" / HELD_OUT / "test" / "blob"
    anomalib_cli(
        "predict", *_model_args(tiny_clip_path), "--ckpt_path", str(trained["checkpoint"]),
        "--data", str(folder), "--default_root_dir", "predict", cwd=workspace,
    )  # fmt: skip
    return workspace / "predict"


def test_predict_on_a_folder_writes_visualisations(workspace: Path, single_process_predictions: Path) -> None:
    folder = workspace / "data" / HELD_OUT / "test" / "blob"
    written = sorted(single_process_predictions.rglob("*.png"))
    assert len(written) == len(list(folder.glob("*.png")))
    assert len(_read_predictions(single_process_predictions)) == len(written)


def test_ddp_predict_writes_one_table_and_one_overlay_per_image(
    workspace: Path, tiny_clip_path: Path, trained: dict[str, Path], single_process_predictions: Path
) -> None:
    # 13 images over 2 processes: the ranks get 7 and 6 of them.
    folder = workspace / "ddp_images"
    folder.mkdir()
    images = sorted((workspace / "data" / HELD_OUT / "test").rglob("*.png"))
    images.append(workspace / "data" / "alpha" / "test" / "good" / "000.png")
    for image in images:
        name = image.name if image.parent.name == "blob" else f"{image.parent.name}_{image.name}"
        shutil.copy(image, folder / name)
    assert len(images) == 13
    anomalib_cli(
        "predict", *_model_args(tiny_clip_path), "--ckpt_path", str(trained["checkpoint"]),
        "--data", str(folder), "--default_root_dir", "ddp_predict",
        "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2",
        cwd=workspace,
    )  # fmt: skip
    results = workspace / "ddp_predict"
    predictions = _read_predictions(results)
    assert sorted(predictions) == sorted(path.name for path in folder.glob("*.png"))
    assert sorted(path.name for path in results.rglob("*.png")) == sorted(predictions)  # the overlays
    assert not list(results.rglob("predictions.rank*.csv"))  # the ranks' part files are merged and removed
    # The same scores as one process gives for the images both runs scored.
    for name, row in _read_predictions(single_process_predictions).items():
        assert float(predictions[name]["score"]) == pytest.approx(float(row["score"]), abs=1e-5), name
        assert predictions[name]["decision"] == row["decision"], name


def test_wrong_prompts_fail_with_a_clear_message(
    workspace: Path, tiny_clip_path: Path, trained: dict[str, Path]
) -> None:
    result = anomalib_cli(
        "test", *_model_args(tiny_clip_path), "--model.n_ctx", "8", "--ckpt_path", str(trained["checkpoint"]),
        "--data", "MVTecAD", "--data.root", "data", "--data.category", HELD_OUT, "--data.num_workers", "0",
        cwd=workspace, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "n_ctx=12 context vectors, the model n_ctx=8" in result.stdout + result.stderr

    result = anomalib_cli(
        "test", *_model_args(tiny_clip_path), "--model.prompt_weights", str(workspace / "missing.pth"),
        "--data", "MVTecAD", "--data.root", "data", "--data.category", HELD_OUT, cwd=workspace, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "missing.pth" in result.stdout + result.stderr

    # Asked to train prompts, but `test` trains none: refused (without the flag, released prompts are taken).
    result = anomalib_cli(
        "test", *_model_args(tiny_clip_path), "--model.train_prompts", "true",
        "--data", "MVTecAD", "--data.root", "data", "--data.category", HELD_OUT, "--data.num_workers", "0",
        cwd=workspace, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "has no trained prompts" in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("subcommand", "config"),
    [
        ("test", "zero_shot_mvtec.yaml"),
        ("test", "zero_shot_visa.yaml"),
        ("fit", "train_prompts_mvtec.yaml"),
        ("fit", "train_prompts_visa.yaml"),
    ],
)
def test_shipped_configs_parse(workspace: Path, subcommand: str, config: str) -> None:
    path = Path(__file__).resolve().parents[1] / "configs" / config
    result = anomalib_cli(subcommand, "--config", str(path), "--print_config", cwd=workspace)
    assert "anomalib_anomalyclip.AnomalyCLIP" in result.stdout


def test_ddp_fit_with_two_cpu_processes(workspace: Path, tiny_clip_path: Path) -> None:
    result = anomalib_cli(
        "fit",
        *_model_args(tiny_clip_path),
        "--model.epochs", "2",
        "--data", "anomalib_anomalyclip.data.AuxiliaryDataModule",
        "--data.sources", f"[{{format: mvtec, root: data, categories: {TRAIN_CATEGORIES}}}]",
        "--data.num_workers", "0",
        "--trainer.accelerator", "cpu",
        "--trainer.strategy", "ddp",
        "--trainer.devices", "2",
        *_csv_logger(workspace / "ddp_logs"),
        "--default_root_dir", "ddp",
        cwd=workspace,
    )  # fmt: skip
    assert list((workspace / "ddp").rglob("model.ckpt"))
    losses = [float(row["train_loss"]) for row in _read_metrics(workspace / "ddp_logs") if row.get("train_loss")]
    assert len(losses) == 2
    # Both ranks share one feature cache: the second epoch reads what either rank computed in the first.
    output = result.stdout + result.stderr
    assert "shared by 2 processes" in output
    assert "Feature cache, epoch 2: 36 hits, 0 misses" in output
    assert not list((workspace / "ddp").rglob("feature_cache"))  # the temporary cache is removed

"""Few-shot AnomalyCLIP and the released-prompt default through anomalib's command line, on generated data."""

from __future__ import annotations

import csv
import dataclasses
import logging
import socket
from pathlib import Path

import pytest
import torch

from anomalib_anomalyclip import weights
from anomalib_anomalyclip.testing.toy_data import make_mvtec_like_dataset

pytestmark = pytest.mark.slow

IMAGE_SIZE = 56


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("few_shot_cli")
    return make_mvtec_like_dataset(root / "data", categories=("alpha",), image_size=64, n_train_good=6, n_test_good=3)


def _model_args(tiny_clip_path: Path) -> list[str]:
    return ["--model", "AnomalyCLIP", "--model.pretrained", str(tiny_clip_path), "--model.image_size", str(IMAGE_SIZE)]


def _data_args(data: Path) -> list[str]:
    return ["--data", "MVTecAD", "--data.root", str(data), "--data.category", "alpha", "--data.num_workers", "0"]


def test_few_shot_train_then_predict_with_the_checkpoint(
    data: Path,
    tiny_clip_path: Path,
    tiny_prompt_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from anomalib.cli import AnomalibCLI

    few_shot = ["--model.prompt_weights", str(tiny_prompt_path), "--model.k_shot", "4"]
    run, predicted = tmp_path / "run", tmp_path / "predicted"
    with caplog.at_level(logging.INFO, logger="anomalib_anomalyclip"):
        AnomalibCLI(
            ["train", *_model_args(tiny_clip_path), *few_shot, *_data_args(data), "--default_root_dir", str(run)]
        )
    printed = capsys.readouterr().out
    assert "image_AUROC" in printed and "pixel_AUROC" in printed
    assert "few-shot references (4 from the train split of MVTecAD)" in caplog.text
    (checkpoint,) = run.rglob("model.ckpt")

    folder = data / "alpha" / "test" / "blob"
    AnomalibCLI(
        ["predict", *_model_args(tiny_clip_path), "--ckpt_path", str(checkpoint), "--data", str(folder),
         "--default_root_dir", str(predicted)]
    )  # fmt: skip
    (table,) = predicted.rglob("predictions.csv")
    with table.open() as file:
        from_checkpoint = {Path(row["path"]).name: float(row["score"]) for row in csv.DictReader(file)}
    assert len(from_checkpoint) == len(list(folder.glob("*.png")))

    assert all(0 <= score <= 1 for score in from_checkpoint.values())


def test_plain_train_takes_the_released_prompts_of_the_other_dataset(
    data: Path,
    tiny_clip_path: Path,
    tiny_prompt_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from anomalib.cli import AnomalibCLI

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the released prompts must come from the cache")

    monkeypatch.setattr(socket, "create_connection", refuse)
    cache = tmp_path / "cache"
    (cache / "prompts").mkdir(parents=True)
    released = cache / "prompts" / "anomalyclip-visa.pth"
    released.write_bytes(tiny_prompt_path.read_bytes())  # stands in for the authors' file, served from the cache
    entry = weights.RELEASED_PROMPTS["anomalyclip-visa"]
    checksum = weights.file_checksum(released, entry.checksum_kind)
    monkeypatch.setitem(weights.RELEASED_PROMPTS, entry.name, dataclasses.replace(entry, checksum=checksum))
    monkeypatch.setenv(weights.CACHE_ENV_VAR, str(cache))

    root = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="anomalib_anomalyclip"):
        AnomalibCLI(["train", *_model_args(tiny_clip_path), *_data_args(data), "--default_root_dir", str(root)])
    assert "released prompts 'anomalyclip-visa' (trained on VisA)" in caplog.text
    assert "holds only normal images" in caplog.text
    (checkpoint,) = root.rglob("model.ckpt")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert state["anomalyclip"]["prompts_trained"] is True
    prompts = torch.load(tiny_prompt_path, map_location="cpu", weights_only=False)
    stored = {key.removeprefix("model.prompt_learner."): value for key, value in state["state_dict"].items()}
    assert any(torch.equal(stored[key], value) for key, value in _tensors(prompts).items() if key in stored)


def _tensors(prompts: object) -> dict[str, torch.Tensor]:
    state = prompts.get("state_dict", prompts) if isinstance(prompts, dict) else {}
    return {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}

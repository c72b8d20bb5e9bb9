"""A ``--ckpt_path`` that is not a readable checkpoint: an error that names the file and says what was expected."""

from __future__ import annotations

import re
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from anomalib.engine.plugins.checkpoint_io import AnomalibCheckpointIO
from lightning.pytorch import Trainer

from anomalib_anomalyclip import AnomalyCLIP
from anomalib_anomalyclip.integration.checkpoints import (
    CheckpointFileError,
    CheckpointNotFoundError,
    check_checkpoint_io,
)
from anomalib_anomalyclip.testing.toy_data import make_mvtec_like_dataset

EXPECTED = "Expected a Lightning checkpoint of AnomalyCLIP"


def _text(path: Path) -> Path:
    path.write_text("name,score\na,1\n")
    return path


def _empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _truncated_zip(path: Path) -> Path:
    torch.save({"state_dict": {"w": torch.zeros(64)}}, path)
    path.write_bytes(path.read_bytes()[:100])
    return path


def _plain_dict(path: Path) -> Path:
    torch.save({"weights": torch.zeros(2)}, path)
    return path


# A file maker, the error type and what the message says about the file.
BAD_FILES: dict[str, tuple[Callable[[Path], Path], type[Exception], str]] = {
    "missing": (lambda path: path, CheckpointNotFoundError, "Checkpoint file not found: '{path}'"),
    "folder": (lambda path: path.mkdir() or path, CheckpointFileError, "Checkpoint path '{path}' is not a file"),
    "text": (_text, CheckpointFileError, "Cannot read '{path}' as a checkpoint: it is a text file"),
    "empty": (_empty, CheckpointFileError, "Cannot read '{path}' as a checkpoint: it is an empty file"),
    "truncated": (_truncated_zip, CheckpointFileError, "Cannot read '{path}' as a checkpoint: it is binary data"),
    "other dict": (_plain_dict, CheckpointFileError, "'{path}' is not a Lightning checkpoint: it lacks"),
}


@pytest.fixture(params=list(BAD_FILES))
def bad_file(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, type[Exception], str]:
    make, error, message = BAD_FILES[request.param]
    path = make(tmp_path / "model.ckpt")
    return path, error, re.escape(message.format(path=path))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("checkpoint_data")
    make_mvtec_like_dataset(root, categories=("alpha",), image_size=32, n_train_good=1, n_test_good=1, n_test_defect=1)
    return root


def _model(tiny_clip_path: Path, **kwargs: object) -> AnomalyCLIP:
    return AnomalyCLIP(pretrained=str(tiny_clip_path), image_size=56, **kwargs)


def test_load_from_checkpoint_names_the_file(bad_file: tuple[Path, type[Exception], str]) -> None:
    path, error, message = bad_file
    with pytest.raises(error, match=message) as raised:
        AnomalyCLIP.load_from_checkpoint(path)
    assert EXPECTED in str(raised.value)
    assert isinstance(raised.value, ValueError)


def test_missing_checkpoint_is_also_a_file_not_found_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"model\.ckpt"):
        AnomalyCLIP.load_from_checkpoint(tmp_path / "model.ckpt")


@pytest.mark.parametrize("kind", ["prompts", "clip"])
def test_weight_files_point_to_their_options(kind: str, tiny_clip_path: Path, tiny_prompt_path: Path) -> None:
    path = {"prompts": tiny_prompt_path, "clip": tiny_clip_path}[kind]
    with pytest.raises(CheckpointFileError, match=re.escape(f"'{path}' is not a Lightning checkpoint")) as raised:
        AnomalyCLIP.load_from_checkpoint(path)
    assert "--model.prompt_weights" in str(raised.value)


def test_engine_test_with_a_bad_ckpt_path_names_the_file(tiny_clip_path: Path, data_root: Path, tmp_path: Path) -> None:
    path = _text(tmp_path / "notes.ckpt")
    datamodule = MVTecAD(root=data_root, category="alpha", num_workers=0)
    engine = Engine(default_root_dir=tmp_path / "run", logger=False)
    with pytest.raises(
        CheckpointFileError, match=re.escape(f"Cannot read '{path}' as a checkpoint: it is a text")
    ) as raised:
        engine.test(_model(tiny_clip_path), datamodule=datamodule, ckpt_path=path)
    assert EXPECTED in str(raised.value)


def test_valid_checkpoints_load_unchanged(tiny_clip_path: Path, tiny_prompt_path: Path, tmp_path: Path) -> None:
    trained = _model(tiny_clip_path, prompt_weights=str(tiny_prompt_path))
    trainer = Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", default_root_dir=tmp_path)
    trainer.strategy.connect(trained)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)

    io = AnomalibCheckpointIO()
    check_checkpoint_io(io)
    check_checkpoint_io(io)  # wrapping twice checks once
    assert io.load_checkpoint.__wrapped__.__self__ is io
    checkpoint = io.load_checkpoint(path, weights_only=False)
    assert checkpoint["state_dict"].keys() == torch.load(path, weights_only=False)["state_dict"].keys()

    loaded = AnomalyCLIP.load_from_checkpoint(path, pretrained=str(tiny_clip_path))
    for name, value in trained.model.prompt_learner.state_dict().items():
        assert torch.equal(loaded.model.prompt_learner.state_dict()[name], value)


def test_untrusted_types_are_refused_with_the_file_named(tmp_path: Path) -> None:
    """A pickle with a class that weights-only loading does not trust: refused, naming the file and the class."""
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2.6", "value": Fraction(1, 2)}, path)
    with pytest.raises(
        CheckpointFileError, match=re.escape(f"'{path}' as a checkpoint: it asks to load fractions.Fraction")
    ) as raised:
        AnomalyCLIP.load_from_checkpoint(path)
    assert raised.value.__cause__ is None and raised.value.__suppress_context__

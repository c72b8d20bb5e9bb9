"""The patches of anomalib's code (anomalib_anomalyclip.cli.patches): still fitting, and doing their job.

Each patched function's parameters are pinned: an anomalib, Lightning or jsonargparse release that changes one
fails here, naming the patch to revisit (its docstring says why it exists and what the upstream fix would be).
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from pathlib import Path

import pytest
from anomalib.cli.cli import AnomalibCLI
from anomalib.engine import Engine

from anomalib_anomalyclip import AnomalyCLIP
from anomalib_anomalyclip.cli.logs import names_anomalyclip, quiet_command_line
from anomalib_anomalyclip.cli.patches import PATCHED, TRAINER_SETTINGS, cut_training_to_one_batch, install
from anomalib_anomalyclip.cli.support import unknown_argument_message

PARAMETERS = {
    "cli arguments": ["self", "args", "run"],
    "cli steps": ["self"],
    "cli instantiate": ["self"],
    "cli run": ["self"],
    "cli parse": ["kwargs"],
    "parser error": ["self", "message", "ex"],
    "cli import order": ["level"],
    "versioned workspace": [
        "self",
        "model",
        "train_dataloaders",
        "val_dataloaders",
        "test_dataloaders",
        "datamodule",
        "dataset",
        "versioned_dir",
    ],
    "real latest folder": ["root_dir"],
}


def _patched_function(module: str, qualified_name: str) -> object:
    found: object = importlib.import_module(module)
    for name in qualified_name.split("."):
        found = getattr(found, name)
    return found


@pytest.mark.parametrize("patch", sorted(PATCHED))
def test_each_patched_function_keeps_the_parameters_the_patch_was_written_for(patch: str) -> None:
    install()
    module, qualified_name = PATCHED[patch]
    function = _patched_function(module, qualified_name)
    parameters = list(inspect.signature(function).parameters)  # follows the wrappers to the original
    assert parameters == PARAMETERS[patch], f"{module}.{qualified_name} changed: revisit the patch '{patch}'"


def test_every_patch_is_pinned() -> None:
    assert set(PATCHED) == set(PARAMETERS)


def test_the_trainer_settings_cut_in_a_running_fit_still_exist() -> None:
    from lightning.pytorch import Trainer

    trainer = Trainer(logger=False, enable_checkpointing=False, max_epochs=15, accelerator="cpu")
    for setting in TRAINER_SETTINGS:
        owner_path, _, name = setting.rpartition(".")
        owner = trainer if not owner_path else getattr(trainer, owner_path)
        assert hasattr(owner, name), setting
    cut_training_to_one_batch(trainer)
    assert trainer.fit_loop.max_epochs == 1 and trainer.limit_train_batches == 1


def test_the_cli_and_the_engine_are_patched() -> None:
    install()
    assert getattr(AnomalibCLI, "_anomalyclip_patched", False)
    assert getattr(Engine, "_anomalyclip_patched", False)


def test_a_mistyped_model_argument_is_answered_with_the_closest_names(capsys) -> None:
    install()
    with pytest.raises(SystemExit) as stop:
        AnomalibCLI(["test", "--model", "AnomalyCLIP", "--model.mutual_scorng", "true"], run=False)
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ERROR: --model.mutual_scorng"), lines
    assert "--model.mutual_scoring" in lines[0] and "--model.help AnomalyCLIP" in lines[0]


def test_the_suggestion_lists_only_close_names() -> None:
    message = unknown_argument_message(AnomalyCLIP, "kshot", "train")
    assert "Did you mean --model.k_shot " in message and "anomalib train --model.help" in message
    grouped = unknown_argument_message(AnomalyCLIP, "mutual.fractoin", "test")
    assert "Did you mean --model.mutual.fraction " in grouped
    old = unknown_argument_message(AnomalyCLIP, "mutual_scorng", "test")
    assert "--model.mutual.enabled (formerly --model.mutual_scoring)" in old
    assert "Did you mean" not in unknown_argument_message(AnomalyCLIP, "zzzzzz", "test")


def test_other_parse_errors_keep_the_program_name_in_the_tip(capsys, monkeypatch) -> None:
    install()
    args = ["test", "--model", "AnomalyCLIP", "--data.categry", "x"]
    monkeypatch.setattr("sys.argv", ["anomalib", *args])
    with pytest.raises(SystemExit):
        AnomalibCLI(args, run=False)
    assert "run: anomalib test --help" in capsys.readouterr().err


def _our_model(tiny_clip_path: Path, tiny_prompt_path: Path) -> AnomalyCLIP:
    return AnomalyCLIP(pretrained=str(tiny_clip_path), image_size=56, prompt_weights=str(tiny_prompt_path))


def test_test_and_predict_of_our_model_write_new_versions(tmp_path, tiny_clip_path, tiny_prompt_path) -> None:
    install()
    model = _our_model(tiny_clip_path, tiny_prompt_path)
    root = tmp_path / "results" / model.name
    (root / "latest").mkdir(parents=True)  # a real folder, as anomalib's `test` used to leave
    (root / "latest" / "config.yaml").write_text("first run")
    for _ in range(3):  # e.g. test, then train, then predict
        Engine(default_root_dir=tmp_path / "results", logger=False)._setup_workspace(model)
    assert (root / "v0" / "config.yaml").read_text() == "first run"
    assert sorted(path.name for path in root.iterdir()) == ["latest", "v0", "v1", "v2", "v3"]
    assert (root / "latest").is_symlink() and (root / "latest").resolve() == (root / "v3").resolve()


def test_other_models_keep_anomalib_s_workspace(tmp_path) -> None:
    from anomalib.models import Padim

    install()
    model = Padim(backbone="resnet18", pre_trained=False, layers=["layer1"], n_features=10)
    engine = Engine(default_root_dir=tmp_path, logger=False)
    engine._setup_workspace(model)
    assert not (tmp_path / "Padim" / "v0").exists()


def test_a_command_line_names_anomalyclip_directly_or_in_its_config(tmp_path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  class_path: anomalib_anomalyclip.AnomalyCLIP\n")
    assert names_anomalyclip(["test", "--model", "AnomalyCLIP"])
    assert names_anomalyclip(["test", "--config", str(config)])
    assert names_anomalyclip(["test", f"--config={config}"])
    assert not names_anomalyclip(["test", "--model", "Padim", "--config", str(tmp_path / "missing.yaml")])


def test_library_warnings_are_silenced_unless_verbose(monkeypatch) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monkeypatch.setenv("ANOMALYCLIP_VERBOSE", "1")
        assert not quiet_command_line(["test", "--model", "AnomalyCLIP"])
        warnings.warn("kept", FutureWarning, stacklevel=1)
        monkeypatch.delenv("ANOMALYCLIP_VERBOSE")
        monkeypatch.delenv("ANOMALYCLIP_LOG_LEVEL", raising=False)
        assert quiet_command_line(["test", "--model", "AnomalyCLIP"])
        warnings.warn("dropped", FutureWarning, stacklevel=1)
    assert [str(warning.message) for warning in caught] == ["kept"]

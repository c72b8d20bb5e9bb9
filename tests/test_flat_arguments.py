"""Runs written with the flat model arguments of earlier versions keep working, upgraded to the groups.

``tests/fixtures/flat_arguments`` holds, for a zero-shot, a 4-shot, a tiled 4-shot and a mutual-scoring model, the
checkpoint and ``config.yaml`` that ``anomalib train`` wrote at e89d444 (flat arguments) and the ``predictions.csv``
that ``anomalib predict`` gave then (see ``make.py`` there).
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
import yaml
from test_cli_end_to_end import anomalib_cli

from anomalib_anomalyclip.cli.arguments import upgrade_command_line
from anomalib_anomalyclip.config import AnomalyCLIPConfig, MutualScoring, Tiling, upgrade

FIXTURES = Path(__file__).parent / "fixtures" / "flat_arguments"
RUNS = ("zero_shot", "four_shot", "tiled_four_shot", "mutual")


def _load_maker() -> object:
    spec = importlib.util.spec_from_file_location("flat_arguments_make", FIXTURES / "make.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("flat")
    _load_maker().make_inputs(root)
    return root


def _rows(path: Path) -> dict[str, tuple[float, str]]:
    with path.open() as file:
        return {Path(row["path"]).name: (float(row["score"]), row["decision"]) for row in csv.DictReader(file)}


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNS)
def test_runs_of_flat_arguments_predict_as_they_did(name: str, work: Path) -> None:
    fixture = FIXTURES / name
    result = anomalib_cli(
        "predict", "--config", str(fixture / "model.yaml"), "--ckpt_path", str(fixture / "model.ckpt"),
        "--data", "images", "--default_root_dir", f"out_{name}", cwd=work,
    )  # fmt: skip
    assert "holds the flat model arguments of earlier versions" in result.stderr
    (written,) = (work / f"out_{name}").rglob("predictions.csv")
    expected, got = _rows(fixture / "predictions.csv"), _rows(written)
    assert sorted(got) == sorted(expected)
    for image, (score, decision) in expected.items():
        assert abs(got[image][0] - score) <= 1e-5, image
        assert got[image][1] == decision, image


@pytest.mark.parametrize("name", RUNS)
def test_config_files_of_flat_arguments_upgrade_to_the_same_model(name: str) -> None:
    flat = yaml.safe_load((FIXTURES / name / "config.yaml").read_text())["model"]["init_args"]
    components = ("pre_processor", "post_processor", "evaluator", "visualizer")
    config = AnomalyCLIPConfig.from_arguments(**{k: v for k, v in upgrade(flat).items() if k not in components})
    assert config.dpam.start_layer == flat["dpam_start_layer"] == 3
    assert config.prompts.seed == config.few_shot.seed == flat["seed"]
    assert config.k_shot == flat["k_shot"]
    assert config.mutual.enabled == flat["mutual_scoring"]
    assert config.tiling.enabled == (flat["tile_size"] is not None)
    if flat["mutual_scoring"]:
        assert config.mutual == MutualScoring(enabled=True, blocks=(3, 6), pool_size=10, seed=flat["seed"])
    if flat["tile_size"]:
        assert config.tiling == Tiling(enabled=True, tile_size=56, working_size=112)


def test_old_flags_are_rewritten_with_one_note_each() -> None:
    args, notes = upgrade_command_line(
        ["predict", "--model", "AnomalyCLIP", "--model.mutual_scoring", "true", "--model.mutual_pool_size=10",
         "--model.tile_working_size", "[112, 112]", "--model.feature_cache", "false", "--data", "images"]
    )  # fmt: skip
    assert args == [
        "predict", "--model", "AnomalyCLIP", "--model.mutual.enabled", "true", "--model.mutual.pool_size", "10",
        "--model.tiling.working_size", "[112, 112]", "--model.feature_cache.enabled", "false", "--data", "images",
    ]  # fmt: skip
    assert notes == [
        "--model.mutual_scoring is now --model.mutual.enabled",
        "--model.mutual_pool_size is now --model.mutual.pool_size",
        "--model.tile_working_size is now --model.tiling.working_size",
        "--model.feature_cache is now --model.feature_cache.enabled",
    ]


def test_the_short_switches_stand_for_enabled() -> None:
    args, notes = upgrade_command_line(
        ["test", "--model", "AnomalyCLIP", "--model.mutual", "true", "--model.tiling=false"]
    )
    assert args == [
        "test",
        "--model",
        "AnomalyCLIP",
        "--model.mutual.enabled",
        "true",
        "--model.tiling.enabled",
        "false",
    ]
    assert notes == []


@pytest.mark.parametrize(
    "args",
    [
        ["fit", "--model", "Padim", "--model.n_features", "100"],
        # ExportedAnomalyCLIP's own --model.mutual is a plain switch, not AnomalyCLIP's group
        ["predict", "--model", "ExportedAnomalyCLIP", "--model.path", "model.xml", "--model.mutual", "true"],
    ],
)
def test_other_models_command_lines_are_left_alone(args: list[str]) -> None:
    assert upgrade_command_line(args) == (args, [])

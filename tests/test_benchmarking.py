"""Tests of the benchmark harness: configuration, tables, chart, progress, and a whole offline run."""

from __future__ import annotations

import csv
import io
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from anomalib_anomalyclip.testing.toy_data import make_mvtec_like_dataset
from anomalyclip_bench import BenchmarkConfigError, load_config, parse_config
from anomalyclip_bench.chart import plot_means
from anomalyclip_bench.cli import main
from anomalyclip_bench.config import expand_grid
from anomalyclip_bench.results import (
    FAILED,
    MEAN,
    OK,
    JobResult,
    metrics_from_test_output,
    results_table,
    write_markdown,
)
from anomalyclip_bench.runner import BenchmarkRunner, Progress, check_classes

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs" / "benchmark"
RUNNER_CONFIGS = sorted(path for path in CONFIG_DIR.glob("*.yaml") if not path.name.startswith("anomalib_pipeline"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CATEGORIES = ("alpha", "beta")


def _config(**overrides: object) -> dict:
    content = {
        "datasets": [{"name": "D", "class_path": "MVTecAD", "init_args": {"root": "x"}, "categories": ["a", "b"]}],
        "models": [{"class_path": "Patchcore"}],
    }
    return {**content, **overrides}


# --------------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------------


def test_grid_expands_into_named_model_variants() -> None:
    points = expand_grid({"dpam_kind": {"grid": ["vv", "qq"]}, "feature_layers": {"grid": [None, [6, 24]]}, "x": 1})
    assert [suffix for _, suffix in points] == [
        " [dpam_kind=vv, feature_layers=null]",
        " [dpam_kind=vv, feature_layers=[6, 24]]",
        " [dpam_kind=qq, feature_layers=null]",
        " [dpam_kind=qq, feature_layers=[6, 24]]",
    ]
    assert points[1][0] == {"dpam_kind": "vv", "feature_layers": [6, 24], "x": 1}
    assert expand_grid({"x": 1}) == [({"x": 1}, "")]


def test_config_lists_jobs_dataset_by_dataset() -> None:
    config = parse_config(
        _config(
            models=[
                {"name": "A", "class_path": "AnomalyCLIP", "init_args": {"loss": {"grid": ["glocal", "global"]}}},
                {"class_path": "Patchcore", "datasets": ["E"]},
            ],
            datasets=[
                {"name": "D", "class_path": "MVTecAD", "categories": ["a", "b"]},
                {"name": "E", "class_path": "Kolektor", "metrics": ["image"]},
            ],
        )
    )
    assert [str(job) for job in config.jobs()] == [
        "A [loss=glocal] | D/a",
        "A [loss=glocal] | D/b",
        "A [loss=global] | D/a",
        "A [loss=global] | D/b",
        "A [loss=glocal] | E",
        "A [loss=global] | E",
        "Patchcore | E",
    ]
    assert config.datasets[1].levels == ("image",)
    assert config.datasets[1].categories == (None,)
    assert [model.index for model in config.models] == [0, 1, 2]


def test_select_by_base_name_dataset_and_category() -> None:
    config = parse_config(
        _config(
            models=[{"name": "A", "class_path": "AnomalyCLIP", "init_args": {"loss": {"grid": ["glocal", "local"]}}}]
        )
    )
    assert len(config.select(models=["A"]).models) == 2
    assert [model.name for model in config.select(models=["A [loss=local]"]).models] == ["A [loss=local]"]
    assert [str(job) for job in config.select(categories=["b"]).jobs()] == [
        "A [loss=glocal] | D/b",
        "A [loss=local] | D/b",
    ]
    with pytest.raises(BenchmarkConfigError, match="Unknown dataset"):
        config.select(datasets=["nope"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (_config(extra=1), "Option 'extra' is not accepted"),
        (_config(seed="x"), r'(?s)Parser key "seed".*Got value: x'),
        (_config(trainer=[1]), r'Parser key "trainer"'),
        (_config(models=[]), "`models` must be a non-empty list"),
        (_config(models=[{"name": "P"}]), r"models\[0\]: Option 'class_path' is required"),
        (_config(models=[{"class_path": "Patchcore", "init_args": [1]}]), r'models\[0\]: Parser key "init_args"'),
        (
            _config(models=[{"class_path": "Patchcore"}, {"class_path": "Patchcore"}]),
            "appear twice on the same dataset",
        ),
        (_config(models=[{"class_path": "Patchcore", "datasets": ["nope"]}]), "Unknown dataset"),
        (
            _config(models=[{"class_path": "Patchcore", "init_args": {"x": {"grid": []}}}]),
            r"models\[0\]\.init_args\.x\.grid must be a non-empty list",
        ),
        (
            _config(models=[{"class_path": "AnomalyCLIP", "train": {"epochs": 1}}]),
            r"""(?s)models\[0\]: Parser key "train".*Option 'epochs' is not accepted""",
        ),
        (_config(models=[{"class_path": "AnomalyCLIP", "train": {}}]), r"models\[0\]\.train needs `data`"),
        (
            _config(datasets=[{"class_path": "MVTecAD", "init_args": {"category": "a"}, "categories": ["a"]}]),
            "not both",
        ),
        (_config(datasets=[{"class_path": "MVTecAD", "metrics": ["voxel"]}]), r'(?s)Parser key "metrics".*voxel'),
        (_config(datasets=[{"class_path": "MVTecAD", "categories": "a"}]), r'datasets\[0\]: Parser key "categories"'),
        (_config(datasets=[{"class_path": "MVTecAD", "download": "maybe"}]), r'Parser key "download"'),
        (_config(datasets=[{"class_path": "MVTecAD", "bogus": 1}]), r"datasets\[0\]: Option 'bogus' is not accepted"),
    ],
)
def test_invalid_configs_are_rejected_with_the_reason(content: dict, message: str) -> None:
    with pytest.raises(BenchmarkConfigError, match=message):
        parse_config(content)


def test_a_configuration_that_is_not_a_mapping_is_rejected() -> None:
    with pytest.raises(BenchmarkConfigError, match="must be a mapping"):
        parse_config([1])


def test_nested_class_specs_and_grids_are_kept_as_written() -> None:
    pre_processor = {"class_path": "anomalib.pre_processing.PreProcessor", "init_args": {"transform": None}}
    init_args = {"pre_processor": pre_processor, "layers": [{"class_path": "X"}], "k": {"grid": [1, 2]}}
    config = parse_config(_config(models=[{"class_path": "Patchcore", "init_args": init_args}]))
    assert [model.init_args for model in config.models] == [
        {"pre_processor": pre_processor, "layers": [{"class_path": "X"}], "k": k} for k in (1, 2)
    ]


def test_a_model_name_may_repeat_on_other_datasets() -> None:
    config = parse_config(
        _config(
            datasets=[{"name": "D", "class_path": "MVTecAD"}, {"name": "E", "class_path": "Visa"}],
            models=[
                {"name": "A", "class_path": "AnomalyCLIP", "datasets": ["D"]},
                {"name": "A", "class_path": "AnomalyCLIP", "datasets": ["E"]},
            ],
        )
    )
    assert [str(job) for job in config.jobs()] == ["A | D", "A | E"]


@pytest.mark.parametrize("path", RUNNER_CONFIGS, ids=lambda path: path.name)
def test_shipped_configs_parse_and_name_existing_classes(path: Path) -> None:
    config = load_config(path)
    check_classes(config)
    assert config.jobs()


def test_paper_config_covers_the_17_datasets_with_the_papers_prompts() -> None:
    config = load_config(CONFIG_DIR / "paper_datasets.yaml")
    assert len(config.datasets) == 17
    prompts = {job.dataset.name: job.model.init_args["prompt_weights"] for job in config.jobs()}
    assert prompts.pop("MVTec AD") == "anomalyclip-visa"
    assert set(prompts.values()) == {"anomalyclip-mvtec"}
    levels = {dataset.name: dataset.levels for dataset in config.datasets}
    assert {name for name, level in levels.items() if level == ("image",)} == {
        "HeadCT",
        "BrainMRI",
        "Br35H",
        "COVID-19",
    }
    assert levels["ISIC"] == levels["TN3K"] == ("pixel",)


def test_headline_configs_compare_the_three_models() -> None:
    for name, prompts in (("mvtec_from_visa", "anomalyclip-visa"), ("visa_from_mvtec", "anomalyclip-mvtec")):
        config = load_config(CONFIG_DIR / f"{name}.yaml")
        assert [model.class_path for model in config.models] == ["AnomalyCLIP", "Patchcore", "WinClip"]
        assert config.models[0].init_args["prompt_weights"] == prompts
    for name in ("mvtec_from_visa_train", "visa_from_mvtec_train"):
        assert load_config(CONFIG_DIR / f"{name}.yaml").trained_models()


# --------------------------------------------------------------------------------------------------------------------
# Tables, chart, progress
# --------------------------------------------------------------------------------------------------------------------


def _results() -> list[JobResult]:
    scores = {"image_AUROC": 90.0, "image_AP": 95.0, "pixel_AUROC": 80.0}
    return [
        JobResult("A", "D", "a", OK, scores, 1.0),
        JobResult("A", "D", "b", OK, {key: value - 10 for key, value in scores.items()}, 2.0),
        JobResult("B", "D", "a", OK, scores, 1.0),
        JobResult("B", "D", "b", FAILED, error="FileNotFoundError: category folder x/b not found"),
        JobResult("C", "D", "a", FAILED, error="RuntimeError: no | weights"),
        JobResult("A", "E", "E", OK, {"image_AUROC": 70.0}, 1.0),
    ]


def test_table_has_a_row_per_model_and_category_and_a_mean_per_model() -> None:
    table = results_table(_results())
    assert list(zip(table["dataset"], table["model"], table["category"], strict=True)) == [
        ("D", "A", "a"), ("D", "A", "b"), ("D", "A", MEAN),
        ("D", "B", "a"), ("D", "B", "b"), ("D", "B", MEAN),
        ("D", "C", "a"), ("D", "C", MEAN),
        ("E", "A", "E"), ("E", "A", MEAN),
    ]  # fmt: skip
    means = table[table["category"] == MEAN].set_index(["dataset", "model"])
    assert means.loc[("D", "A"), "image_AUROC"] == pytest.approx(85.0)
    assert means.loc[("D", "A"), "status"] == OK
    assert means.loc[("D", "B"), "image_AUROC"] == pytest.approx(90.0)  # over the successful category only
    assert means.loc[("D", "B"), "status"] == "ok 1/2"
    assert means.loc[("D", "B"), "error"] == "failed: b"
    assert means.loc[("D", "C"), "status"] == FAILED
    assert math.isnan(means.loc[("D", "C"), "image_AUROC"])
    assert math.isnan(means.loc[("D", "A"), "pixel_AUPRO"])


def test_both_aupros_are_columns_in_percent() -> None:
    output = {"image_AUROC": 0.9, "pixel_AUPRO": 0.5, "pixel_AUPRO_paper": 0.45}
    assert metrics_from_test_output(output, ["pixel"]) == {"pixel_AUPRO": 50.0, "pixel_AUPRO_paper": 45.0}
    table = results_table([JobResult("A", "D", "a", OK, metrics_from_test_output(output, ["image", "pixel"]), 1.0)])
    columns = list(table.columns)
    assert columns.index("pixel_AUPRO_paper") == columns.index("pixel_AUPRO") + 1
    assert table.loc[0, "pixel_AUPRO_paper"] == pytest.approx(45.0)


def test_aupimo_is_an_extra_metric_nan_where_undefined() -> None:
    from anomalib.data import ImageBatch

    from anomalyclip_bench.runner import build_evaluator

    assert parse_config(_config(extra_metrics=["AUPIMO"])).extra_metrics == ("AUPIMO",)
    assert parse_config(_config()).extra_metrics == ()
    with pytest.raises(BenchmarkConfigError, match="extra_metrics"):
        parse_config(_config(extra_metrics=["AUPRC"]))
    names = [metric.name for metric in build_evaluator(["image", "pixel"], ("AUPIMO",)).test_metrics]
    assert names[-1] == "pixel_AUPIMO"
    assert all(metric.name.startswith("image_") for metric in build_evaluator(["image"], ("AUPIMO",)).test_metrics)
    assert metrics_from_test_output({"pixel_AUPIMO": 0.25}, ["pixel"]) == {"pixel_AUPIMO": 25.0}
    aupimo = build_evaluator(["pixel"], ("AUPIMO",)).test_metrics[-1]
    masks = torch.zeros(2, 1, 32, 32, dtype=torch.bool)
    masks[1, :, 4:12, 4:12] = True  # 1 856 normal pixels: AUPIMO's false positive rates 1e-5..1e-4 are out of reach
    aupimo.update(ImageBatch(image=torch.rand(2, 3, 32, 32), anomaly_map=torch.rand(2, 1, 32, 32), gt_mask=masks))
    assert math.isnan(float(aupimo.compute()))


def test_markdown_has_means_per_dataset_tables_and_failures(tmp_path: Path) -> None:
    path = write_markdown(results_table(_results()), tmp_path / "results.md", "Title", ["- note"])
    text = path.read_text()
    assert text.startswith("# Title\n\n- note\n")
    for heading in ("## Means", "## D", "## E", "## Failures"):
        assert heading in text
    assert "| D | A | 85.0 | 90.0 | 75.0 |" in text  # image AUROC, image AP, pixel AUROC; F1/AUPRO never reported
    assert "pixel AUPRO" not in text
    assert "| **mean** | **A** | **85.0** |" in text
    assert "failed: RuntimeError: no \\| weights" in text  # pipes escaped inside cells


def test_chart_is_a_png_even_with_a_dataset_without_results(tmp_path: Path) -> None:
    results = [*_results(), JobResult("A", "F", "F", FAILED, error="x")]
    path = plot_means(results_table(results), tmp_path / "means.png")
    assert path.read_bytes().startswith(PNG_MAGIC)


def test_progress_reports_position_elapsed_and_eta() -> None:
    now = [0.0]
    stream = io.StringIO()
    progress = Progress({"evaluate": 4}, stream, clock=lambda: now[0])
    progress.start("first")
    now[0] = 60.0
    progress.finish("first", "ok", "evaluate")
    progress.start("second")
    assert stream.getvalue().splitlines() == [
        "[1/4] first | elapsed 0:00:00 | ETA ?",
        "[1/4] first: ok",
        "[2/4] second | elapsed 0:01:00 | ETA 0:03:00",
    ]


def test_eta_counts_each_kind_of_step_at_its_own_pace() -> None:
    now = [0.0]
    stream = io.StringIO()
    progress = Progress({"train": 2, "evaluate": 10}, stream, clock=lambda: now[0])
    progress.start("train a")
    now[0] = 1000.0
    progress.finish("train a", "done", "train")
    progress.start("train b")  # nothing evaluated yet: every step at the training pace
    now[0] = 2000.0
    progress.finish("train b", "done", "train")
    progress.start("evaluate 1")
    now[0] = 2010.0
    progress.finish("evaluate 1", "ok", "evaluate")
    progress.finish("evaluate 2", "skipped", "evaluate")  # did not run: no time
    progress.start("evaluate 3")
    lines = stream.getvalue().splitlines()
    assert lines[2] == "[ 2/12] train b | elapsed 0:16:40 | ETA 3:03:20"
    assert lines[-1] == "[ 5/12] evaluate 3 | elapsed 0:33:30 | ETA 0:00:40"  # 8 evaluations at 5 s


# --------------------------------------------------------------------------------------------------------------------
# Whole runs
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An auxiliary dataset (to learn prompts on) and a target dataset with two categories, both MVTec format."""
    root = tmp_path_factory.mktemp("benchmark_data")
    make_mvtec_like_dataset(
        root / "aux", categories=("gamma", "delta"), image_size=32, n_train_good=0, n_test_good=3, n_test_defect=3
    )
    make_mvtec_like_dataset(
        root / "target", categories=CATEGORIES, image_size=32, n_train_good=3, n_test_good=3, n_test_defect=3
    )
    return root


def _datamodule_args(root: Path) -> dict:
    return {"root": str(root), "train_batch_size": 4, "eval_batch_size": 8, "num_workers": 0}


def _target_dataset(data_root: Path) -> dict:
    """The two-category MVTec-format dataset of ``data_root`` as a benchmark dataset entry."""
    return {
        "name": "Synthetic",
        "class_path": "MVTecAD",
        "init_args": _datamodule_args(data_root / "target"),
        "categories": list(CATEGORIES),
    }


def _write_config(path: Path, content: dict) -> Path:
    path.write_text(yaml.safe_dump(content))
    return path


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as file:
        return list(csv.DictReader(file))


@pytest.mark.slow  # tens of seconds to minutes of CPU: the full suite runs it
def test_offline_benchmark_of_anomalyclip_patchcore_and_winclip(
    data_root: Path, tiny_clip_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    small_input = {
        "class_path": "anomalib.pre_processing.PreProcessor",
        "init_args": {"transform": {"class_path": "torchvision.transforms.v2.Resize", "init_args": {"size": [64, 64]}}},
    }
    aux = {
        "class_path": "anomalib_anomalyclip.data.AuxiliaryDataModule",
        "init_args": _datamodule_args(data_root / "aux"),
    }
    content = {
        "output_dir": str(tmp_path / "out"),
        "seed": 0,
        "trainer": {"accelerator": "cpu", "devices": 1},
        "datasets": [_target_dataset(data_root)],
        "models": [
            {"name": "AnomalyCLIP", "class_path": "AnomalyCLIP",
             "init_args": {"pretrained": str(tiny_clip_path), "image_size": 56, "epochs": 1}, "train": {"data": aux}},
            {"name": "PatchCore", "class_path": "Patchcore",
             "init_args": {"backbone": "resnet18", "pre_trained": False, "pre_processor": small_input}},
            {"name": "WinCLIP", "class_path": "WinClip"},
        ],
    }  # fmt: skip
    config = _write_config(tmp_path / "benchmark.yaml", content)

    status = main(["--config", str(config)])

    out = tmp_path / "out"
    rows = _read_csv(out / "results.csv")
    assert [(row["model"], row["category"]) for row in rows] == [
        (model, category) for model in ("AnomalyCLIP", "PatchCore", "WinCLIP") for category in (*CATEGORIES, MEAN)
    ]
    for row in rows:
        if row["model"] != "WinCLIP":
            assert row["status"] == OK, row
            keys = ("image_AUROC", "image_AP", "pixel_AUPRO", "pixel_AUPRO_paper")
            assert all(0.0 <= float(row[key]) <= 100.0 for key in keys), row
    winclip = [row for row in rows if row["model"] == "WinCLIP"]
    # WinCLIP downloads its CLIP weights when it is built: offline, every row fails with the reason.
    assert all(row["status"] in {OK, FAILED} for row in winclip)
    assert all(row["error"] for row in winclip if row["status"] == FAILED)
    assert status == (1 if any(row["status"] == FAILED for row in winclip) else 0)

    markdown = (out / "results.md").read_text()
    for model in ("AnomalyCLIP", "PatchCore", "WinCLIP"):
        assert f"| Synthetic | {model} |" in markdown
    assert "| pixel AUPRO | pixel AUPRO (paper) |" in markdown
    assert (out / "means.png").read_bytes().startswith(PNG_MAGIC)
    assert len(list((out / "prompts").glob("*.ckpt"))) == 1

    progress = capsys.readouterr().err
    assert progress.count("train AnomalyCLIP on AuxiliaryDataModule") == 2  # announced and finished, once
    assert "[2/7] AnomalyCLIP | Synthetic/alpha | elapsed" in progress
    assert "ETA" in progress


@pytest.mark.slow  # tens of seconds to minutes of CPU: the full suite runs it
def test_anomalyclip_is_built_once_per_dataset_and_scores_as_if_rebuilt(
    data_root: Path, tiny_clip_path: Path, tiny_prompt_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reused across categories and scored once per image, zero-shot AnomalyCLIP reports what a rebuilt, validated
    model (anomalib's Engine.fit + test, as before) reports."""
    from anomalib_anomalyclip.method.dpam import DualPathVisualEncoder
    from anomalyclip_bench import runner as runner_module

    content = {
        "output_dir": "unused",
        "trainer": {"accelerator": "cpu", "devices": 1},
        "datasets": [_target_dataset(data_root)],
        "models": [
            {"name": "AnomalyCLIP", "class_path": "AnomalyCLIP",
             "init_args": {"pretrained": str(tiny_clip_path), "image_size": 56,
                           "prompt_weights": str(tiny_prompt_path)}},
        ],
    }  # fmt: skip
    builds: list[str] = []
    build = BenchmarkRunner._build_model_once

    def counting_build(runner: BenchmarkRunner, job: object) -> object:
        builds.append(job.category)
        return build(runner, job)

    monkeypatch.setattr(BenchmarkRunner, "_build_model_once", counting_build)
    encoded: list[int] = []  # images per call of the visual encoder
    encode = DualPathVisualEncoder.forward

    def counting_encode(
        encoder: DualPathVisualEncoder, images: torch.Tensor, *args: object, **kwargs: object
    ) -> object:
        encoded.append(len(images))
        return encode(encoder, images, *args, **kwargs)

    monkeypatch.setattr(DualPathVisualEncoder, "forward", counting_encode)

    def run(tmp: str) -> list[JobResult]:
        encoded.clear()
        return BenchmarkRunner(parse_config({**content, "output_dir": tmp}), stream=io.StringIO()).run()

    test_images = len(CATEGORIES) * 6  # 3 good and 3 defective test images per category
    reused = run(str(data_root / "out_reused"))
    assert builds == ["alpha"]
    assert sum(encoded) == test_images  # each test image encoded once: no validation pass
    monkeypatch.setattr(runner_module, "_is_anomalyclip", lambda model: False)
    rebuilt = run(str(data_root / "out_rebuilt"))
    assert builds == ["alpha", "alpha", "beta"]
    assert sum(encoded) == 2 * test_images  # validated on the test split, then tested

    assert [result.status for result in reused + rebuilt] == [OK] * 4
    for again, fresh in zip(reused, rebuilt, strict=True):
        assert again.category == fresh.category
        # In %; float32 rounding of the two normalisations. (The paper's AUPRO depends on the maps' scale, which
        # validation makes piecewise linear around its threshold; here every map value lies above that threshold.)
        assert again.metrics == pytest.approx(fresh.metrics, abs=1e-4), again.category
    assert reused[0].metrics != reused[1].metrics  # each category's own data, not the first one's again


def test_failures_become_rows_and_a_broken_model_is_built_once(data_root: Path, tmp_path: Path) -> None:
    content = {
        "output_dir": str(tmp_path / "out"),
        "trainer": {"accelerator": "cpu"},
        "datasets": [
            {"name": "Synthetic", "class_path": "MVTecAD", "init_args": _datamodule_args(data_root / "target"),
             "categories": ["missing", "alpha", "beta"]},
        ],
        "models": [{"name": "Broken", "class_path": "Patchcore", "init_args": {"backbone": "no_such_backbone"}}],
    }  # fmt: skip
    stream = io.StringIO()
    results = BenchmarkRunner(parse_config(content), stream=stream).run()

    assert [result.status for result in results] == [FAILED] * 3
    assert results[0].error.startswith("FileNotFoundError: category folder")
    assert "missing" in results[0].error
    assert results[1].error.startswith("model could not be built: RuntimeError: Unknown model (no_such_backbone)")
    assert results[2].error == results[1].error
    assert "skipped: model could not be built" in stream.getvalue()
    assert (tmp_path / "out" / "failures.log").read_text().count("Traceback") == 2


def test_console_script_dry_run_and_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert 'anomalyclip-benchmark = "anomalyclip_bench.cli:main"' in (REPO_ROOT / "pyproject.toml").read_text()
    # `python -m anomalyclip_bench` runs the same main as the console script, from this checkout.
    result = subprocess.run(
        [sys.executable, "-m", "anomalyclip_bench", "--config", str(CONFIG_DIR / "mvtec_from_visa.yaml"),
         "--categories", "bottle", "--dry-run"],
        capture_output=True, text=True, timeout=300, check=False, cwd=REPO_ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:] == [
        "  AnomalyCLIP | MVTec AD/bottle",
        "  PatchCore | MVTec AD/bottle",
        "  WinCLIP | MVTec AD/bottle",
    ]
    bad = _write_config(tmp_path / "bad.yaml", _config(models=[{"class_path": "NoSuchModel"}]))
    assert main(["--config", str(bad), "--dry-run"]) == 2
    unknown_key = _write_config(tmp_path / "unknown_key.yaml", _config(models=[{"class_path": "Patchcore", "x": 1}]))
    assert main(["--config", str(unknown_key), "--dry-run"]) == 2
    assert "models[0]: Option 'x' is not accepted" in capsys.readouterr().err

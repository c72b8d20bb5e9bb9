"""Small messages read as sentences: counts agree with their nouns, layouts and paths are named, advice fits."""

from __future__ import annotations

from pathlib import Path

import pytest

from anomalib_anomalyclip.cli.preflight import dataset_problem, format_report
from anomalib_anomalyclip.data import AuxiliaryDataModule
from anomalib_anomalyclip.method.backbone import _offline_message


def test_the_report_counts_what_is_missing_in_words() -> None:
    assert format_report(["a"]).startswith("AnomalyCLIP cannot start: 1 thing is missing.")
    assert format_report(["a", "b", "c"]).startswith("AnomalyCLIP cannot start: 3 things are missing.")


def test_a_missing_auxiliary_dataset_names_its_layout(tmp_path: Path) -> None:
    problem = dataset_problem(AuxiliaryDataModule, {"root": str(tmp_path / "missing")}, online=False)
    assert problem is not None and "<root>/..." not in problem
    assert "ground_truth/<defect>" in problem and "--data.root" in problem


def test_the_offline_clip_advice_names_the_path_to_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    url = "https://example.org/clip/ViT-L-14-336px.pt"
    message = _offline_message("ViT-L-14-336", "openai", url, "offline")
    assert f"--model.pretrained {tmp_path / 'ViT-L-14-336px.pt'}" in message and "copy it here" not in message


def test_the_benchmark_advice_offline_is_to_put_the_dataset_there(tmp_path: Path) -> None:
    from anomalyclip_bench.config import DatasetSpec
    from anomalyclip_bench.runner import _check_dataset_folder

    spec = DatasetSpec(
        name="MVTecAD", class_path="anomalib.data.MVTecAD", init_args={"root": str(tmp_path / "MVTecAD")}
    )
    with pytest.raises(FileNotFoundError) as error:
        _check_dataset_folder(spec, "bottle")
    assert "Put the dataset there" in str(error.value) and "docs/benchmark.md" in str(error.value)

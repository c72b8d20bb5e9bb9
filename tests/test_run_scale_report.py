"""The run-scale benchmark's report: the extrapolation from one subset, the table and the chart of earlier runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from anomalyclip_bench.mutual_cost import MutualCost, extrapolate
from anomalyclip_bench.run_scale import RunCost, main


def test_the_extrapolation_scales_the_mutual_time_with_the_subset_size_and_keeps_the_memory() -> None:
    subset = MutualCost(
        pool=32, encoder_seconds=6.0, mutual_seconds=20.0, tokens_mb=342, peak_mb=4700, scoring_added_mb=1400
    )
    rows = {row["images"]: row for row in extrapolate(subset, [32, 64, 10_000])}
    assert rows[32]["seconds"] == pytest.approx(32 * 26.0)  # one subset of the measured size: as measured
    assert rows[64]["subsets"] == 2 and rows[64]["seconds"] == pytest.approx(64 * 26.0)
    assert rows[10_000]["subsets"] == 313  # subsets of 31 or 32 images
    assert 10_000 * 25.3 < rows[10_000]["seconds"] < 10_000 * 26.0
    assert {row["peak_mb"] for row in rows.values()} == {4700}


def test_earlier_runs_are_tabled_and_drawn(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs = [RunCost(50, 32.0, 1235.0, 202.0, 50), RunCost(10_000, 6500.0, 1250.0, 212.0, 10_000),
            RunCost(50, 30.0, 1300.0, 220.0, 50, "openvino")]  # fmt: skip
    saved = tmp_path / "runs.json"
    saved.write_text(json.dumps([run.__dict__ for run in runs]))
    main(["--from-json", str(saved), "--chart", str(tmp_path / "chart.png")])
    printed = capsys.readouterr().out
    assert "| eager | 10,000 | 10,000 | 1250.0 | 212.0 | 0.001 | 0.650 | 6500 |" in printed
    assert "| openvino | 50 | 50 | 1300.0 | 220.0 | - | 0.600 | 30 |" in printed
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""The offline walkthrough runs every documented flow with the real commands, and prints them as typed."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
FLOWS = (
    "$ python -m anomalib_anomalyclip.testing.tiny_clip clip.pt",
    "$ anomalib fit --model AnomalyCLIP",
    "$ anomalib test --model AnomalyCLIP",
    "$ anomalib train --model AnomalyCLIP --model.pretrained clip.pt --model.image_size 56 --model.prompt_weights "
    "prompts.ckpt --model.k_shot 2",
    "$ anomalib predict --model AnomalyCLIP --ckpt_path results/AnomalyCLIP/MVTecAD/gamma/v",
    "--model.mutual true",
    "--model.tiling true",
    "$ anomalib export --model AnomalyCLIP --ckpt_path",
    "$ TRUST_REMOTE_CODE=1 anomalib predict --model ExportedAnomalyCLIP --model.path exported/weights/torch/model.pt",
    "$ anomalyclip-benchmark --config",
)


def test_the_walkthrough_runs_every_flow(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "hooks"), str(REPO)])}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(
        [sys.executable, "-m", "anomalib_anomalyclip.testing.walkthrough", "--work-dir", str(tmp_path / "walk")],
        capture_output=True, text=True, env=env, timeout=900, check=False,
    )  # fmt: skip
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    commands = [line for line in output.splitlines() if line.startswith("$ ")]
    for flow in FLOWS:
        assert any(flow in command for command in commands), f"not run: {flow}"
    assert "Every flow ran" in output
    assert (tmp_path / "walk" / "results" / "benchmark" / "tiny_offline" / "results.csv").is_file()
    seconds = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert seconds < 240, f"{seconds:.0f} s of CPU"

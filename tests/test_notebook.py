"""The quick-start notebook runs top to bottom in the tiny setting (random tiny CLIP, generated images)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "anomalyclip_quickstart.ipynb"
KERNEL_NAME = "anomalyclip-test-venv"

pytestmark = pytest.mark.slow


@pytest.fixture
def venv_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A kernel spec that runs this interpreter (the current venv), found first through ``JUPYTER_PATH``."""
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "anomalib-anomalyclip tests",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MPLBACKEND", "agg")
    return KERNEL_NAME


def test_quickstart_notebook_runs_in_the_tiny_setting(tmp_path: Path, venv_kernel: str) -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    (parameters,) = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert 'SETTING = "tiny"' in parameters.source
    client = nbclient.NotebookClient(
        notebook,
        kernel_name=venv_kernel,
        timeout=300,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert not [output for output in outputs if output.get("output_type") == "error"]
    work = tmp_path / "anomalyclip_quickstart"
    (table,) = work.rglob("predictions.csv")
    assert len(table.read_text().splitlines()) == 1 + 4
    assert list((work / "export").rglob("model.pt"))

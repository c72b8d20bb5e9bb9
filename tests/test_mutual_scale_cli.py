"""Mutual scoring at run scale through anomalib's command line: resume after a crash, returned predictions, memory."""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_mutual_scoring_cli import counting_encoder

from anomalib_anomalyclip.cache import CACHE_ENV_VAR
from anomalib_anomalyclip.integration.pool_state import PoolState
from anomalib_anomalyclip.testing.toy_data import write_image_folder

pytestmark = pytest.mark.slow

IMAGES = 16  # mutual_pool_size 5: subsets of 6, 5 and 5 images


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scale") / "line"
    write_image_folder(root, IMAGES, image_size=56)
    return root


@pytest.fixture(autouse=True)
def patched_cli() -> Iterator[None]:
    """anomalib's command line as the ``anomalib`` command runs it for this package's models."""
    from anomalib.cli import AnomalibCLI  # noqa: F401

    from anomalib_anomalyclip.cli.patches import install

    install()
    yield


@pytest.fixture
def predict(tiny_clip_path: Path, tiny_prompt_path: Path) -> Callable[..., Any]:
    """``anomalib predict`` with mutual scoring (pool size 5) of a folder into a results folder; returns the CLI."""
    from anomalib.cli import AnomalibCLI

    def run(folder: Path, root: Path, *extra: str) -> Any:
        return AnomalibCLI(
            ["predict", "--model", "AnomalyCLIP", "--model.pretrained", str(tiny_clip_path), "--model.image_size",
             "56", "--model.prompt_weights", str(tiny_prompt_path), "--model.mutual", "true",
             "--model.mutual.pool_size", "5", "--data", str(folder), "--default_root_dir", str(root), *extra]
        )  # fmt: skip

    return run


def _rows(root: Path) -> list[list[str]]:
    """The rows of the newest ``predictions.csv`` under ``root`` (each predict run writes a version of its own)."""
    table = max(root.rglob("predictions.csv"), key=lambda path: path.stat().st_mtime_ns)
    with table.open(newline="") as file:
        return sorted(csv.reader(file))


class KilledError(Exception):
    """Stands for Ctrl-C or a killed process after the first subset."""


def test_a_crashed_predict_resumes_and_writes_what_an_uninterrupted_run_writes(
    folder: Path, predict: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "cache_whole"))
    cli = predict(folder, tmp_path / "whole")
    assert cli.engine.trainer.predict_loop.return_predictions is False  # no list of every batch's outputs
    uninterrupted = _rows(tmp_path / "whole")
    assert len(uninterrupted) == IMAGES + 1  # the header, then each image once
    assert not any((tmp_path / "cache_whole" / "mutual").iterdir())  # a finished predict removes its state

    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "cache"))
    save = PoolState.save_subset
    with pytest.MonkeyPatch.context() as patch:

        def killed_after_the_first(self: PoolState, index: int, *args: object) -> None:
            if any(self.folder.glob("subset_?????.pt")):
                raise KilledError
            save(self, index, *args)

        patch.setattr(PoolState, "save_subset", killed_after_the_first)
        with pytest.raises(KilledError):
            predict(folder, tmp_path / "resumed")
    (state,) = (tmp_path / "cache" / "mutual").iterdir()
    assert len(list(state.glob("subset_?????.pt"))) == 1
    with counting_encoder() as encoded:
        predict(folder, tmp_path / "resumed")
    assert sum(encoded) == IMAGES - 6  # the first subset (6 images) is not encoded again
    assert _rows(tmp_path / "resumed") == uninterrupted
    assert not state.exists()


def test_predict_returns_the_predictions_when_asked(folder: Path, predict: Callable[..., Any], tmp_path: Path) -> None:
    cli = predict(folder, tmp_path, "--return_predictions", "true")
    assert cli.engine.trainer.predict_loop.return_predictions is True
    assert sum(len(batch.pred_score) for batch in cli.engine.trainer.predict_loop.predictions) == IMAGES


def test_predict_memory_does_not_grow_with_the_number_of_images(
    tmp_path: Path, tiny_clip_path: Path, tiny_prompt_path: Path
) -> None:
    from anomalyclip_bench.run_scale import added_mb_per_image, held_mb_per_image, measure_predict, prepare_folder

    # The acceptance is 280 against 30 images at 518 px with mutual_pool_size 10 (benchmarks/mutual_scale.py);
    # this is the same ratio on 30 against 10 images with mutual_pool_size 5, each run a process of its own, with
    # allocator settings under which the resident memory follows the live tensors (run-to-run noise below 1 MiB).
    costs = [
        measure_predict(prepare_folder(tmp_path, count, 518), tiny_clip_path, tiny_prompt_path,
                        tmp_path / f"run_{count}", image_size=518, pool_size=5, exact_peak=True)
        for count in (10, 30)
    ]  # fmt: skip
    assert [cost.rows for cost in costs] == [10, 30]  # every image once in predictions.csv
    allowed = held_mb_per_image(518) / 4  # a quarter of what the in-memory path held per image: 0.42 MiB
    assert added_mb_per_image(*costs) <= allowed, costs

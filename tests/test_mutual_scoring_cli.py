"""Mutual scoring through anomalib's command line: test and predict, one encoder pass per image, DDP, bad input."""

from __future__ import annotations

import contextlib
import csv
import logging
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from anomalib_anomalyclip import AnomalyCLIP  # also makes the short name known to anomalib's CLI
from anomalib_anomalyclip.errors import AnomalyCLIPError, ExportUnavailableError
from anomalib_anomalyclip.method.dpam import DualPathVisualEncoder
from anomalib_anomalyclip.testing.toy_data import make_mvtec_like_dataset

pytestmark = pytest.mark.slow

IMAGE_SIZE = "56"
MUTUAL = ["--model.mutual", "true"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two generated categories: ``alpha`` has 6 normal and 4 anomalous test images (blobs and stains)."""
    root = tmp_path_factory.mktemp("mutual_cli")
    return make_mvtec_like_dataset(
        root / "data", ("alpha", "beta"), image_size=64, n_train_good=1, n_test_good=5, n_test_defect=2,
        defects=("blob", "stain"),
    )  # fmt: skip


@pytest.fixture(scope="module")
def folder(data: Path) -> Path:
    """13 images to predict on in two sub-folders, so two pools: ``a`` holds 8 of alpha's, ``b`` 5 of beta's."""
    root = data.parent / "to_predict"
    for name, images in (("a", _test_images(data, "alpha")[:8]), ("b", _test_images(data, "beta")[:5])):
        (root / name).mkdir(parents=True)
        for image in images:
            shutil.copy(image, root / name / f"{image.parent.name}_{image.name}")
    return root


def _test_images(data: Path, category: str) -> list[Path]:
    return sorted((data / category / "test").rglob("*.png"))


def _model_args(tiny_clip_path: Path, tiny_prompt_path: Path) -> list[str]:
    return [
        "--model", "AnomalyCLIP", "--model.pretrained", str(tiny_clip_path), "--model.image_size", IMAGE_SIZE,
        "--model.prompt_weights", str(tiny_prompt_path),
    ]  # fmt: skip


@contextlib.contextmanager
def counting_encoder() -> Iterator[list[int]]:
    """The batch sizes of every forward call of the visual encoder inside the block."""
    sizes: list[int] = []
    forward = DualPathVisualEncoder.forward

    def counting(self: DualPathVisualEncoder, images: torch.Tensor, *args: object, **kwargs: object) -> object:
        sizes.append(int(images.shape[0]))
        return forward(self, images, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DualPathVisualEncoder, "forward", counting)
        yield sizes


def _read_predictions(root: Path) -> dict[str, float]:
    """Scores of the one ``predictions.csv`` under ``root``, by path relative to the predicted folder's parent."""
    (table,) = root.rglob("predictions.csv")
    with table.open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert len({row["path"] for row in rows}) == len(rows)  # each image once
    return {"/".join(Path(row["path"]).parts[-2:]): float(row["score"]) for row in rows}


def test_test_prints_image_and_pixel_metrics_and_encodes_each_image_once(
    data: Path, tiny_clip_path: Path, tiny_prompt_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from anomalib.cli import AnomalibCLI

    from anomalib_anomalyclip.cache import cache_root

    states_before = set((cache_root() / "mutual").glob("*"))
    with counting_encoder() as encoded:
        AnomalibCLI(
            ["test", *_model_args(tiny_clip_path, tiny_prompt_path), *MUTUAL, "--data", "MVTecAD", "--data.root",
             str(data), "--data.category", "alpha", "--data.num_workers", "0", "--default_root_dir", str(tmp_path)]
        )  # fmt: skip
    printed = capsys.readouterr().out
    assert "image_AUROC" in printed and "pixel_AUROC" in printed
    # anomalib validates on the test images before testing: the second loop reuses the first one's scores.
    assert sum(encoded) == len(_test_images(data, "alpha")) == 9
    assert set((cache_root() / "mutual").glob("*")) <= states_before  # the finished test left no state behind


@pytest.fixture(scope="module")
def predicted(
    folder: Path, tiny_clip_path: Path, tiny_prompt_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, float], int]:
    """``anomalib predict`` in this process on the folder: the scores by image, and the images encoded."""
    from anomalib.cli import AnomalibCLI

    root = tmp_path_factory.mktemp("predict")
    with counting_encoder() as encoded:
        AnomalibCLI(
            ["predict", *_model_args(tiny_clip_path, tiny_prompt_path), *MUTUAL, "--data", str(folder),
             "--default_root_dir", str(root)]
        )  # fmt: skip
    return _read_predictions(root), sum(encoded)


def test_predict_on_a_folder_writes_one_row_per_image_and_pools_each_sub_folder(
    folder: Path, predicted: tuple[dict[str, float], int], tiny_clip_path: Path, tiny_prompt_path: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    from anomalib.cli import AnomalibCLI

    scores, encoded = predicted
    images = sorted("/".join(path.parts[-2:]) for path in folder.rglob("*.png"))
    assert sorted(scores) == images and encoded == len(images) == 13
    assert all(0 <= score <= 1 for score in scores.values())
    # Sub-folder a is a pool of its own: predicting on it alone gives its images the same scores.
    AnomalibCLI(
        ["predict", *_model_args(tiny_clip_path, tiny_prompt_path), *MUTUAL, "--data", str(folder / "a"),
         "--default_root_dir", str(tmp_path)]
    )  # fmt: skip
    alone = _read_predictions(tmp_path)
    assert len(alone) == 8
    for name, score in alone.items():
        assert score == pytest.approx(scores[name], abs=1e-6), name


def test_ddp_predict_with_two_processes_gives_the_single_process_scores(
    folder: Path, predicted: tuple[dict[str, float], int], tiny_clip_path: Path, tiny_prompt_path: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    from test_cli_end_to_end import anomalib_cli

    # Two pools (8 and 5 images), one subset each: each process encodes and scores one pool, and receives no tokens.
    result = anomalib_cli(
        "predict", *_model_args(tiny_clip_path, tiny_prompt_path), *MUTUAL, "--data", str(folder),
        "--default_root_dir", "ddp", "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp",
        "--trainer.devices", "2", cwd=tmp_path,
    )  # fmt: skip
    assert not list((tmp_path / "ddp").rglob("predictions.rank*.csv"))
    printed = result.stdout + result.stderr
    encoded = re.findall(r"process (\d) of 2 encoded (\d+) image\(s\) in 1 subset\(s\)", printed)
    assert sorted(encoded) == [("0", "8"), ("1", "5")], printed[-3000:]
    scores, _ = predicted
    ddp = _read_predictions(tmp_path / "ddp")
    assert sorted(ddp) == sorted(scores)
    for name, score in scores.items():
        assert ddp[name] == pytest.approx(score, abs=1e-5), name


def test_a_single_image_is_refused_because_mutual_scoring_needs_a_pool(
    folder: Path, tiny_clip_path: Path, tiny_prompt_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from anomalib.cli import AnomalibCLI

    image = next((folder / "a").glob("*.png"))
    arguments = ["predict", *_model_args(tiny_clip_path, tiny_prompt_path), *MUTUAL, "--data", str(image)]
    with pytest.raises(SystemExit) as exit_info:  # the CLI prints our errors once, without a traceback
        AnomalibCLI([*arguments, "--default_root_dir", str(tmp_path)])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert re.search(r"needs at least 5 images per pool.*are 1\. Score more images", error)
    assert error.count("needs at least 5 images") == 1


def test_the_parser_lists_the_fusions(tiny_clip_path: Path, capsys: pytest.CaptureFixture) -> None:
    from anomalib.cli import AnomalibCLI

    with pytest.raises(SystemExit):
        AnomalibCLI(["test", "--model", "AnomalyCLIP", "--model.mutual.fusion", "xx", "--print_config"])
    error = capsys.readouterr().err
    assert "fusion" in error and "'mean'" in error and "'mutual'" in error


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"fraction": 0.0}, r"mutual.fraction must lie in \(0, 1\], got 0.0"),
        ({"fraction": 1.5}, r"mutual.fraction must lie in \(0, 1\], got 1.5"),
        ({"radii": [1, 2]}, r"radii \(mutual.radii\) must be odd positive integers .* got 2"),
        ({"radii": [-3]}, r"odd positive integers .* got -3"),
        ({"blocks": [6, 30]}, r"mutual.blocks \[30\] outside the visual transformer's blocks 1..24"),
        ({"pool_size": 3}, r"mutual.pool_size=3 is below .* 5 images"),
    ],
    ids=["fraction-0", "fraction-1.5", "even-radius", "negative-radius", "missing-block", "pool-size-3"],
)
def test_bad_settings_fail_at_construction_with_a_clear_message(
    tiny_clip_path: Path, tiny_prompt_path: Path, arguments: dict, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(AnomalyCLIPError, match=message), caplog.at_level(logging.ERROR):
        AnomalyCLIP(pretrained=str(tiny_clip_path), image_size=56, prompt_weights=str(tiny_prompt_path),
                    mutual={"enabled": True, **arguments})  # fmt: skip
    assert "mutual" in caplog.text or "LNAMD" in caplog.text  # logged plainly for anomalib's command line


def test_a_torch_export_of_mutual_scoring_is_refused_with_what_to_do(
    tiny_clip_path: Path, tiny_prompt_path: Path, tmp_path: Path
) -> None:
    model = AnomalyCLIP(pretrained=str(tiny_clip_path), image_size=56, prompt_weights=str(tiny_prompt_path),
                        mutual=True)  # fmt: skip
    with pytest.raises(ExportUnavailableError, match=r"--export_type openvino or onnx"):
        model.to_torch(tmp_path)
    assert not list(tmp_path.rglob("*.pt"))

"""Bad input through the paths users hit: anomalib's Engine (what the CLI runs) on their own files.

Each kind of bad input is either converted correctly or stops the run with one message that names the files and the
fix, before anything is scored.
"""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from PIL import Image

from anomalib_anomalyclip import AnomalyCLIP
from anomalib_anomalyclip.data import AuxiliaryDataModule, BadImageError, PredictFolder
from anomalib_anomalyclip.integration.callbacks import CSV_COLUMNS
from anomalib_anomalyclip.method.backbone import WeightsUnavailableError
from anomalib_anomalyclip.method.prompts import PromptCheckpointError, PromptConfig, PromptLearner, save_prompts
from anomalib_anomalyclip.testing.toy_data import make_mvtec_like_dataset

IMAGE_SIZE = 56


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(3)
    return save_prompts(PromptLearner(PromptConfig(width=64)), tmp_path_factory.mktemp("prompts") / "prompts.pt")


@pytest.fixture(scope="module")
def model(tiny_clip_path: Path, prompt_file: Path) -> AnomalyCLIP:
    return AnomalyCLIP(pretrained=str(tiny_clip_path), image_size=IMAGE_SIZE, prompt_weights=str(prompt_file))


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mvtec_like_dataset(
        tmp_path_factory.mktemp("bad_input") / "data", categories=("alpha",), image_size=48, n_test_defect=3
    )


def _engine(root: Path) -> Engine:
    return Engine(default_root_dir=root, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)


def _rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _own_images(folder: Path) -> dict[str, Path]:
    """A user's folder: 8-bit, grayscale, its 16-bit twin, RGBA, tiny and non-square images, a sub-folder."""
    (folder / "sub").mkdir(parents=True)
    gray = _rgb(40, 40)[..., 0]
    arrays = {
        "rgb.jpg": _rgb(40, 52, seed=1),
        "gray.png": gray,
        "gray16.png": gray.astype(np.uint16) * 257,
        "rgba.png": np.dstack([_rgb(40, 40, seed=2), np.full((40, 40), 128, np.uint8)]),
        "one_pixel.png": _rgb(1, 1, seed=3),
        "sub/strip.png": _rgb(3, 90, seed=4),
    }
    paths = {}
    for name, array in arrays.items():
        paths[name] = folder / name
        Image.fromarray(array).save(paths[name])
    return paths


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _read_csv(root: Path) -> list[dict[str, str]]:
    (table,) = root.rglob("predictions.csv")
    with table.open(newline="") as file:
        reader = csv.DictReader(file)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        return list(reader)


def test_predict_folder_converts_odd_images_and_writes_a_csv(tmp_path: Path, model: AnomalyCLIP) -> None:
    images = _own_images(tmp_path / "my_images")
    batches = _engine(tmp_path / "results").predict(model, datamodule=PredictFolder(tmp_path / "my_images"))

    rows = {Path(row["path"]): row for row in _read_csv(tmp_path / "results")}
    assert set(rows) == {path.resolve() for path in images.values()}
    for batch in batches:  # the CSV holds anomalib's normalised score and pred_label
        for path, score, label in zip(batch.image_path, batch.pred_score, batch.pred_label, strict=True):
            row = rows[Path(path).resolve()]
            assert 0.0 <= float(row["score"]) <= 1.0
            assert float(row["score"]) == pytest.approx(float(score), abs=1e-6)
            assert row["decision"] == ("anomalous" if label else "normal")
            assert bool(label) == (float(score) > 0.5)
    # the 16-bit image is its 8-bit twin scaled by 257: read correctly, it scores the same
    gray16, gray = (float(rows[images[name].resolve()]["score"]) for name in ("gray16.png", "gray.png"))
    assert gray16 == pytest.approx(gray, abs=1e-5)
    overlays = [path for path in (tmp_path / "results").rglob("*") if path.is_file() and "images" in path.parts]
    assert sorted(path.name for path in overlays) == sorted(path.name for path in images.values())


def test_predict_folder_lists_every_unreadable_file_before_predicting(tmp_path: Path, model: AnomalyCLIP) -> None:
    images = _own_images(tmp_path / "my_images")
    _truncate(images["rgb.jpg"])
    (tmp_path / "my_images" / "notes.png").write_text("not an image")
    with pytest.raises(BadImageError) as error:
        _engine(tmp_path / "results").predict(model, datamodule=PredictFolder(tmp_path / "my_images"))
    message = str(error.value)
    assert message.startswith("2 of 7 images in")
    assert "rgb.jpg: the file is truncated" in message and "notes.png: not an image file" in message
    assert "Copy or export the file again" in message
    assert not list((tmp_path / "results").rglob("predictions.csv"))


def test_empty_folder(tmp_path: Path, model: AnomalyCLIP) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "list.txt").write_text("no images here")
    with pytest.raises(BadImageError, match=r"No images found in .*empty .*1 other file\(s\), with extensions"):
        _engine(tmp_path / "results").predict(model, datamodule=PredictFolder(tmp_path / "empty"))
    # anomalib's own folder path (`--data <folder>`) stops too, with anomalib's message naming the folder
    with pytest.raises(ValueError, match=r"Found 0 images in .*empty"):
        _engine(tmp_path / "results").predict(model, data_path=tmp_path / "empty")


def test_anomalib_folder_path_refuses_what_its_reader_would_get_wrong(tmp_path: Path, model: AnomalyCLIP) -> None:
    images = _own_images(tmp_path / "my_images")
    _truncate(images["rgb.jpg"])
    with pytest.raises(BadImageError) as error:
        _engine(tmp_path / "results").predict(model, data_path=tmp_path / "my_images")
    message = str(error.value)
    assert message.startswith("3 of 6 images of PredictDataset cannot be used:")
    assert "gray16.png: 16-bit grayscale (mode I;16); anomalib's image reader would clip" in message
    assert "rgba.png: has transparent pixels; anomalib's image reader would drop the transparency" in message
    assert "rgb.jpg: the file is truncated" in message
    assert "--data anomalib_anomalyclip.data.PredictFolder --data.path <folder>" in message
    assert not list((tmp_path / "results").rglob("predictions.csv"))

    for name in ("rgb.jpg", "gray16.png", "rgba.png"):
        images.pop(name).unlink()
    _engine(tmp_path / "results").predict(model, data_path=tmp_path / "my_images")
    assert {Path(row["path"]) for row in _read_csv(tmp_path / "results")} == {p.resolve() for p in images.values()}


def test_a_truncated_file_alone_gets_the_advice_for_broken_files(tmp_path: Path, model: AnomalyCLIP) -> None:
    images = _own_images(tmp_path / "my_images")
    for name in ("gray16.png", "rgba.png"):
        images.pop(name).unlink()
    _truncate(images["rgb.jpg"])
    with pytest.raises(BadImageError) as error:
        _engine(tmp_path / "results").predict(model, data_path=tmp_path / "my_images")
    message = str(error.value)
    assert "rgb.jpg: the file is truncated" in message and "Copy or export these files again" in message
    assert "16-bit" not in message and "transparent" not in message


def test_anomalib_datamodule_with_a_16_bit_image_stops_before_scoring(
    tmp_path: Path, model: AnomalyCLIP, dataset_root: Path
) -> None:
    root = tmp_path / "data"
    shutil.copytree(dataset_root, root)
    image = root / "alpha" / "test" / "good" / "001.png"
    gray = np.asarray(Image.open(image).convert("L"))
    Image.fromarray(gray.astype(np.uint16) * 257).save(image)
    datamodule = MVTecAD(root=root, category="alpha", num_workers=0, eval_batch_size=4)
    with pytest.raises(BadImageError, match=r"(?s)001\.png: 16-bit grayscale .*Convert these files to 8-bit RGB"):
        _engine(tmp_path / "results").test(model, datamodule=datamodule)


def _training_model(tiny_clip_path: Path) -> AnomalyCLIP:
    return AnomalyCLIP(pretrained=str(tiny_clip_path), image_size=IMAGE_SIZE, epochs=1)


def test_prompt_training_checks_images_and_masks_before_it_starts(
    tmp_path: Path, tiny_clip_path: Path, dataset_root: Path
) -> None:
    root = tmp_path / "data"
    shutil.copytree(dataset_root, root)
    Image.new("L", (20, 24), 255).save(root / "alpha" / "ground_truth" / "blob" / "001_mask.png")
    (root / "alpha" / "test" / "good" / "002.png").write_bytes(b"")
    datamodule = AuxiliaryDataModule(root=root, num_workers=0)
    with pytest.raises(BadImageError) as error:
        _engine(tmp_path / "results").fit(_training_model(tiny_clip_path), datamodule=datamodule)
    message = str(error.value)
    assert message.startswith("2 of 7 labelled images of AuxiliaryDataModule cannot be used:")
    assert "001_mask.png is 20x24 (WxH) but its image" in message and "fix or regenerate the mask" in message
    assert "002.png: not an image file that Pillow can read" in message


def test_a_truncated_training_image_is_named(tmp_path: Path, tiny_clip_path: Path, dataset_root: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(dataset_root, root)
    _truncate(root / "alpha" / "test" / "blob" / "000.png")
    datamodule = AuxiliaryDataModule(root=root, num_workers=0)
    with pytest.raises(BadImageError, match=r"blob/000\.png: the file is truncated"):
        _engine(tmp_path / "results").fit(_training_model(tiny_clip_path), datamodule=datamodule)


def test_training_on_grayscale_rgba_and_16_bit_images(tmp_path: Path, tiny_clip_path: Path, dataset_root: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(dataset_root, root)
    good = sorted((root / "alpha" / "test" / "good").glob("*.png"))
    Image.open(good[0]).convert("L").save(good[0])
    Image.open(good[1]).convert("RGBA").save(good[1])
    gray = np.asarray(Image.open(good[2]).convert("L"))
    Image.fromarray(gray.astype(np.uint16) * 257).save(good[2])
    model = _training_model(tiny_clip_path)
    _engine(tmp_path / "results").fit(model, datamodule=AuxiliaryDataModule(root=root, num_workers=0))
    assert model.prompt_state.ready


def test_setup_errors_are_logged_plainly(
    tiny_clip_path: Path, prompt_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """anomalib's CLI buries constructor errors in a jsonargparse report; the logged line states them plainly."""
    with caplog.at_level(logging.ERROR), pytest.raises(PromptCheckpointError, match="n_ctx=12 context vectors"):
        AnomalyCLIP(pretrained=str(tiny_clip_path), image_size=IMAGE_SIZE, prompt_weights=str(prompt_file), n_ctx=8)
    assert any("does not fit this model" in record.getMessage() for record in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.ERROR), pytest.raises(WeightsUnavailableError):
        AnomalyCLIP(pretrained="openai", prompt_weights=str(prompt_file))  # offline-ok: HF_HUB_OFFLINE=1, empty cache
    (record,) = [record for record in caplog.records if record.name == "anomalib_anomalyclip.errors"]
    assert "--model.pretrained" in record.getMessage()


def test_predict_folder_is_for_prediction_only(tmp_path: Path) -> None:
    _own_images(tmp_path / "my_images")
    datamodule = PredictFolder(tmp_path / "my_images")
    assert datamodule.category == "my_images"
    assert PredictFolder(tmp_path / "my_images" / "gray.png").category == "gray"
    for loader in (datamodule.train_dataloader, datamodule.test_dataloader):
        with pytest.raises(ValueError, match=r"unlabelled images for `anomalib predict`.*AuxiliaryDataModule"):
            loader()
    assert datamodule.val_dataloader() == []

"""Tests of the auxiliary labelled datamodule."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import AnomalibDataModule, ImageBatch, ImageItem
from PIL import Image
from torchvision.transforms.v2 import Resize

from anomalib_anomalyclip.data import AuxiliaryDataModule, AuxiliaryDataset, has_pixel_mask
from anomalib_anomalyclip.data.samples import collect_samples
from anomalib_anomalyclip.data.sources import SourceSpec
from anomalib_anomalyclip.testing.toy_data import make_mvtec_like_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = ("alpha", "beta", "gamma")
DEFECTS = ("blob", "scratch")


def _make_mvtec(root: Path, size: int = 32, categories: tuple[str, ...] = CATEGORIES) -> Path:
    return make_mvtec_like_dataset(
        root, categories=categories, image_size=size, n_train_good=1, n_test_good=3, n_test_defect=2, defects=DEFECTS
    )


def _make_folder(root: Path, size: int = 48) -> Path:
    """A labelled folder source (good/ and bad/, no masks) made from a generated category."""
    generated = make_mvtec_like_dataset(
        root / "generated", categories=("parts",), image_size=size, n_train_good=0, n_test_good=2, n_test_defect=3
    )
    folder = root / "parts"
    shutil.copytree(generated / "parts" / "test" / "good", folder / "good")
    shutil.copytree(generated / "parts" / "test" / "blob", folder / "bad")
    shutil.rmtree(generated)
    return folder


def _test_images(root: Path) -> set[str]:
    return {str(path) for path in root.glob("*/test/*/*.png")}


def _setup(**kwargs: object) -> AuxiliaryDataModule:
    datamodule = AuxiliaryDataModule(num_workers=0, **kwargs)
    datamodule.setup()
    return datamodule


def _read_mask(path: Path) -> torch.Tensor:
    with Image.open(path) as mask:
        return torch.from_numpy(np.asarray(mask) > 0)


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_mvtec(tmp_path_factory.mktemp("aux") / "MVTecLike")


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_folder(tmp_path_factory.mktemp("aux_folder"))


@pytest.fixture(scope="module")
def datamodule(mvtec_root: Path) -> AuxiliaryDataModule:
    return _setup(root=mvtec_root, train_batch_size=4, eval_batch_size=4)


@pytest.fixture(scope="module")
def mixed(mvtec_root: Path, folder_root: Path) -> AuxiliaryDataModule:
    sources = [
        {"format": "mvtec", "root": str(mvtec_root)},
        {"format": "folder", "root": str(folder_root), "normal_dir": "good", "abnormal_dir": "bad"},
    ]
    return _setup(sources=sources, train_batch_size=4, eval_batch_size=4)


# --------------------------------------------------------------------------------------------------------------------
# Contents
# --------------------------------------------------------------------------------------------------------------------


def test_is_an_anomalib_datamodule(datamodule: AuxiliaryDataModule) -> None:
    assert isinstance(datamodule, AnomalibDataModule)
    assert datamodule.category == "MVTecLike"
    assert datamodule.task == "segmentation"
    assert datamodule.categories == list(CATEGORIES)


def test_training_set_is_every_test_image_of_every_category(datamodule: AuxiliaryDataModule, mvtec_root: Path) -> None:
    expected = _test_images(mvtec_root)
    assert len(expected) == len(CATEGORIES) * (3 + 2 * len(DEFECTS))
    assert len(datamodule.train_data) == len(expected)
    assert set(datamodule.train_data.samples["image_path"]) == expected
    assert not any("/train/" in path for path in datamodule.train_data.samples["image_path"])


def test_validation_and_test_sets_default_to_the_labelled_images(datamodule: AuxiliaryDataModule) -> None:
    train_paths = list(datamodule.train_data.samples["image_path"])
    assert list(datamodule.val_data.samples["image_path"]) == train_paths
    assert list(datamodule.test_data.samples["image_path"]) == train_paths
    assert datamodule.val_data is not datamodule.train_data
    assert datamodule.test_data is not datamodule.val_data


def test_items_labels_and_masks_match_the_folders(datamodule: AuxiliaryDataModule, mvtec_root: Path) -> None:
    dataset = datamodule.train_data
    for index in range(len(dataset)):
        item = dataset[index]
        assert isinstance(item, ImageItem)
        path = Path(item.image_path)
        anomalous = path.parent.name != "good"
        assert int(item.gt_label) == int(anomalous)
        assert item.image.shape == (3, 32, 32)
        assert item.gt_mask.shape == (32, 32)
        if anomalous:
            mask_file = mvtec_root / path.parts[-4] / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
            assert item.mask_path == str(mask_file)
            assert item.gt_mask.any()
            assert torch.equal(item.gt_mask.bool(), _read_mask(mask_file))
        else:
            assert not item.gt_mask.any()


def test_batches_are_anomalib_image_batches(datamodule: AuxiliaryDataModule) -> None:
    seen = 0
    for batch in datamodule.train_dataloader():
        assert isinstance(batch, ImageBatch)
        size = len(batch.image_path)
        assert batch.image.shape == (size, 3, 32, 32)
        assert batch.gt_mask.shape == (size, 32, 32)
        assert batch.gt_mask.dtype == torch.bool
        assert batch.gt_label.shape == (size,)
        assert len(batch.mask_path) == size
        for label, mask_path in zip(batch.gt_label.tolist(), batch.mask_path, strict=True):
            assert (mask_path != "") == bool(label)
        assert bool(has_pixel_mask(batch).all())
        seen += size
    assert seen == len(datamodule.train_data)
    assert sum(len(batch.image_path) for batch in datamodule.val_dataloader()) == len(datamodule.val_data)


def test_held_out_validation_split(mvtec_root: Path) -> None:
    datamodule = _setup(root=mvtec_root, val_split_ratio=0.5, seed=1)
    train = set(datamodule.train_data.samples["image_path"])
    val = set(datamodule.val_data.samples["image_path"])
    assert train.isdisjoint(val)
    assert train | val == _test_images(mvtec_root)
    assert set(datamodule.test_data.samples["image_path"]) == val
    for subset in (datamodule.train_data, datamodule.val_data):
        groups = subset.samples.groupby(["category", "label_index"]).size()
        assert len(groups) == 2 * len(CATEGORIES)  # every (category, label) on both sides
    again = _setup(root=mvtec_root, val_split_ratio=0.5, seed=1)
    assert set(again.val_data.samples["image_path"]) == val


def test_class_names_for(mixed: AuxiliaryDataModule, mvtec_root: Path, folder_root: Path) -> None:
    paths = [
        str(mvtec_root / "beta" / "test" / "good" / "000.png"),
        mvtec_root / "gamma" / "test" / "scratch" / "001.png",
        str(folder_root / "bad" / "002.png"),
    ]
    assert mixed.class_names_for(paths) == ["beta", "gamma", "parts"]
    relative = os.path.relpath(mvtec_root / "alpha" / "test" / "blob" / "000.png")
    assert mixed.class_names_for([relative]) == ["alpha"]
    batch = next(iter(mixed.train_dataloader()))
    assert mixed.class_names_for(batch.image_path) == [
        Path(p).parts[-4] if "MVTecLike" in p else "parts" for p in batch.image_path
    ]
    with pytest.raises(KeyError, match="not an image of this datamodule"):
        mixed.class_names_for([str(mvtec_root / "alpha" / "train" / "good" / "000.png")])


def test_class_names_for_works_before_setup(mvtec_root: Path) -> None:
    datamodule = AuxiliaryDataModule(root=mvtec_root)
    assert datamodule.class_names_for([mvtec_root / "alpha" / "test" / "good" / "001.png"]) == ["alpha"]


# --------------------------------------------------------------------------------------------------------------------
# Sources with and without masks
# --------------------------------------------------------------------------------------------------------------------


def test_mixed_sources_collate_and_flag_maskless_images(mixed: AuxiliaryDataModule, mvtec_root: Path) -> None:
    samples = mixed.train_data.samples
    assert len(samples) == len(_test_images(mvtec_root)) + 5
    maskless = (samples["label_index"] == 1) & (samples["mask_path"] == "")
    assert sorted(Path(path).name for path in samples.loc[maskless, "image_path"]) == [
        "000.png",
        "001.png",
        "002.png",
    ]
    assert set(samples.loc[maskless, "category"]) == {"parts"}
    all_at_once = mixed.train_data.collate_fn([mixed.train_data[i] for i in range(len(samples))])
    assert all_at_once.image.shape[0] == len(samples)
    flags = has_pixel_mask(all_at_once)
    for index, (path, label, mask_path) in enumerate(
        zip(all_at_once.image_path, all_at_once.gt_label.tolist(), all_at_once.mask_path, strict=True)
    ):
        from_folder = "parts" in Path(path).parts[-3]
        if from_folder and label:
            assert mask_path == ""
            assert not flags[index]
            assert not all_at_once.gt_mask[index].any()
        else:
            assert flags[index]
        if label and not from_folder:
            assert mask_path.endswith("_mask.png")


def test_maskless_item_first_in_a_batch(mixed: AuxiliaryDataModule) -> None:
    dataset = mixed.train_data
    samples = dataset.samples
    maskless = np.flatnonzero(((samples["label_index"] == 1) & (samples["mask_path"] == "")).to_numpy())
    masked = np.flatnonzero(((samples["label_index"] == 1) & (samples["mask_path"] != "")).to_numpy())
    normal = np.flatnonzero((samples["label_index"] == 0).to_numpy())
    order = [maskless[0], masked[0], normal[0], maskless[1]]
    batch = dataset.collate_fn([dataset[int(i)] for i in order])
    assert batch.mask_path[0] == "" and batch.mask_path[3] == ""
    assert batch.mask_path[1] == samples["mask_path"].iloc[masked[0]]
    assert batch.mask_path[2] == ""
    assert has_pixel_mask(batch).tolist() == [False, True, True, False]
    assert batch.gt_label.tolist() == [True, True, False, True]
    # images of different sources (48 px and 32 px) are resized to a common size by anomalib's collate
    assert batch.image.shape[-2:] == batch.gt_mask.shape[-2:]


def test_every_batch_of_the_mixed_loader_collates(mixed: AuxiliaryDataModule) -> None:
    total = 0
    for batch in mixed.train_dataloader():
        assert isinstance(batch, ImageBatch)
        assert len(batch.mask_path) == batch.image.shape[0] == batch.gt_mask.shape[0]
        total += batch.image.shape[0]
    assert total == len(mixed.train_data)


def test_folder_source_only_is_a_classification_set(folder_root: Path) -> None:
    datamodule = _setup(
        sources=[{"format": "folder", "root": str(folder_root), "normal_dir": "good", "abnormal_dir": "bad"}]
    )
    assert datamodule.task == "classification"
    item = datamodule.train_data[0]
    assert item.gt_mask is not None and not item.gt_mask.any()
    assert datamodule.categories == ["parts"]


def test_folder_source_with_masks_and_name(tmp_path: Path, mvtec_root: Path) -> None:
    category = mvtec_root / "alpha"
    source = {
        "format": "folder",
        "root": str(category),
        "normal_dir": "test/good",
        "abnormal_dir": ["test/blob", "test/scratch"],
        "mask_dir": ["ground_truth/blob", "ground_truth/scratch"],
        "name": "widget",
    }
    datamodule = _setup(sources=[source])
    samples = datamodule.train_data.samples
    assert len(samples) == 3 + 2 * len(DEFECTS)
    assert (samples.loc[samples["label_index"] == 1, "mask_path"] != "").all()
    assert datamodule.categories == ["widget"]


def test_require_masks_false_keeps_anomalous_images_without_mask(tmp_path: Path) -> None:
    root = _make_mvtec(tmp_path / "data", categories=("alpha",))
    (root / "alpha" / "ground_truth" / "blob" / "001_mask.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"no mask for anomalous image .*001.png.*require_masks"):
        _setup(root=root)
    datamodule = _setup(sources=[{"format": "mvtec", "root": str(root), "require_masks": False}])
    samples = datamodule.train_data.samples
    row = samples[samples["image_path"] == str(root / "alpha" / "test" / "blob" / "001.png")].iloc[0]
    assert row["label_index"] == 1
    assert row["mask_path"] == ""


# --------------------------------------------------------------------------------------------------------------------
# VisA layouts
# --------------------------------------------------------------------------------------------------------------------


def _make_raw_visa(root: Path) -> int:
    """Raw VisA layout with ``split_csv/1cls.csv``; returns the number of test rows."""
    generated = _make_mvtec(root / "generated", categories=("candle", "pcb1"))
    rows = ["object,split,label,image,mask"]
    for category in ("candle", "pcb1"):
        images = root / category / "Data" / "Images"
        masks = root / category / "Data" / "Masks" / "Anomaly"
        for folder in (images / "Normal", images / "Anomaly", masks):
            folder.mkdir(parents=True)
        for index, path in enumerate(sorted((generated / category / "train" / "good").glob("*.png"))):
            shutil.copy(path, images / "Normal" / f"train_{index}.png")
            rows.append(f"{category},train,normal,{category}/Data/Images/Normal/train_{index}.png,")
        for index, path in enumerate(sorted((generated / category / "test" / "good").glob("*.png"))):
            shutil.copy(path, images / "Normal" / f"{index:04d}.png")
            rows.append(f"{category},test,normal,{category}/Data/Images/Normal/{index:04d}.png,")
        for index, path in enumerate(sorted((generated / category / "test" / "blob").glob("*.png"))):
            shutil.copy(path, images / "Anomaly" / f"{index:03d}.png")
            shutil.copy(
                generated / category / "ground_truth" / "blob" / f"{path.stem}_mask.png", masks / f"{index:03d}.png"
            )
            rows.append(
                f"{category},test,anomaly,{category}/Data/Images/Anomaly/{index:03d}.png,"
                f"{category}/Data/Masks/Anomaly/{index:03d}.png"
            )
    (root / "split_csv").mkdir()
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    shutil.rmtree(generated)
    return sum(",test," in row for row in rows)


def test_raw_visa_uses_the_test_rows_of_the_split_csv(tmp_path: Path) -> None:
    n_test = _make_raw_visa(tmp_path / "visa")
    datamodule = _setup(sources=[{"format": "visa", "root": str(tmp_path / "visa")}])
    samples = datamodule.train_data.samples
    assert len(samples) == n_test == 2 * (3 + 2)
    assert datamodule.categories == ["candle", "pcb1"]
    assert (samples.loc[samples["label_index"] == 1, "mask_path"] != "").all()
    assert not samples["image_path"].str.contains("train_").any()
    item = datamodule.train_data[int(np.flatnonzero(samples["label_index"].to_numpy() == 1)[0])]
    assert item.gt_mask.any()
    only_candle = _setup(sources=[{"format": "visa", "root": str(tmp_path / "visa"), "categories": ["candle"]}])
    assert only_candle.categories == ["candle"]


def test_raw_visa_row_without_mask(tmp_path: Path) -> None:
    root = tmp_path / "visa"
    _make_raw_visa(root)
    csv_path = root / "split_csv" / "1cls.csv"
    lines = csv_path.read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if ",anomaly," in line)
    lines[index] = lines[index].rsplit(",", 1)[0] + ","
    csv_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(FileNotFoundError, match=r"lists anomalous image .* but no mask is listed"):
        _setup(sources=[{"format": "visa", "root": str(root)}])
    datamodule = _setup(sources=[{"format": "visa", "root": str(root), "require_masks": False}])
    samples = datamodule.train_data.samples
    assert int(((samples["label_index"] == 1) & (samples["mask_path"] == "")).sum()) == 1


def test_visa_after_anomalibs_split(tmp_path: Path) -> None:
    _make_mvtec(tmp_path / "visa" / "visa_pytorch", categories=("candle", "pcb1"))
    datamodule = _setup(sources=[{"format": "visa", "root": str(tmp_path / "visa")}])
    assert len(datamodule.train_data) == 2 * (3 + 2 * len(DEFECTS))
    assert datamodule.categories == ["candle", "pcb1"]


# --------------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------------


def test_missing_root(tmp_path: Path) -> None:
    missing = tmp_path / "does_not_exist"
    datamodule = AuxiliaryDataModule(root=missing)
    with pytest.raises(FileNotFoundError, match=f"root {re.escape(str(missing))} does not exist"):
        datamodule.setup()


def test_root_without_categories(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no category folders in .*empty.*Expected <root>/<category>/test/"):
        _setup(root=tmp_path / "empty")


def test_category_without_test_split(tmp_path: Path) -> None:
    root = _make_mvtec(tmp_path / "data", categories=("alpha", "beta"))
    shutil.rmtree(root / "beta" / "test")
    with pytest.raises(FileNotFoundError, match="category 'beta' has no test split"):
        _setup(root=root)
    assert _setup(sources=[{"format": "mvtec", "root": str(root), "categories": ["alpha"]}]).categories == ["alpha"]


def test_no_images_found(tmp_path: Path) -> None:
    (tmp_path / "data" / "alpha" / "test" / "good").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images"):
        _setup(root=tmp_path / "data")
    (tmp_path / "folder" / "good").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images"):
        _setup(sources=[{"format": "folder", "root": str(tmp_path / "folder"), "normal_dir": "good"}])


def test_size_mismatched_mask_is_an_error_not_resized(tmp_path: Path) -> None:
    root = _make_mvtec(tmp_path / "data", categories=("alpha",))
    mask_path = root / "alpha" / "ground_truth" / "blob" / "000_mask.png"
    Image.new("L", (20, 24), 255).save(mask_path)
    message = r"Mask .*000_mask.png is 20x24 \(WxH\) but its image .*000.png is 32x32"
    with pytest.raises(ValueError, match=message):  # the datamodule checks every mask before training
        _setup(root=root)
    dataset = AuxiliaryDataset(collect_samples([SourceSpec.from_mapping({"format": "mvtec", "root": str(root)})]))
    index = int(np.flatnonzero((dataset.samples["mask_path"] == str(mask_path)).to_numpy())[0])
    with pytest.raises(ValueError, match=message):  # and so does the dataset when it loads the item
        dataset[index]
    dataset[(index + 1) % len(dataset)]  # the other items still load


def test_unknown_category_and_folder(tmp_path: Path, mvtec_root: Path) -> None:
    with pytest.raises(ValueError, match=r"categories \['delta'\] not found .*available: \['alpha', 'beta', 'gamma'\]"):
        _setup(sources=[{"format": "mvtec", "root": str(mvtec_root), "categories": ["delta"]}])
    with pytest.raises(FileNotFoundError, match=r"`abnormal_dir` folder .*nope does not exist"):
        _setup(sources=[{"format": "folder", "root": str(mvtec_root), "abnormal_dir": "nope"}])


def test_duplicate_images_are_rejected(mvtec_root: Path) -> None:
    sources = [
        {"format": "mvtec", "root": str(mvtec_root)},
        {"format": "folder", "root": str(mvtec_root / "alpha" / "test"), "normal_dir": "good"},
    ]
    with pytest.raises(ValueError, match=r"listed more than once \(by sources \[0, 1\]\)"):
        _setup(sources=sources)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "exactly one of `sources`"),
        ({"root": "a", "sources": [{"format": "mvtec", "root": "a"}]}, ValueError, "exactly one of `sources`"),
        ({"sources": []}, ValueError, "non-empty list"),
        ({"sources": ["./data"]}, TypeError, r"sources\[0\] must be a mapping"),
        ({"sources": [{"format": "coco", "root": "a"}]}, ValueError, r"format.*one of \['mvtec', 'visa', 'folder'"),
        ({"sources": [{"format": "mvtec", "root": "a", "mask": "x"}]}, ValueError, r"unknown key\(s\) \['mask'\]"),
        (
            {"sources": [{"format": "mvtec", "root": "a"}, {"format": "mvtec", "root": "a", "normal_dir": "x"}]},
            ValueError,
            r"sources\[1\]: key\(s\) \['normal_dir'\] do not apply to mvtec sources",
        ),
        ({"sources": [{"format": "mvtec"}]}, ValueError, r"sources\[0\] needs `root`"),
        ({"sources": [{"format": "mvtec", "root": ""}]}, ValueError, "needs a `root` path"),
        ({"sources": [{"format": "folder", "root": "a"}]}, ValueError, "normal_dir` and/or `abnormal_dir"),
        (
            {"sources": [{"format": "folder", "root": "a", "abnormal_dir": ["b", "c"], "mask_dir": ["m", "n", "o"]}]},
            ValueError,
            "`mask_dir` lists 3 folders but `abnormal_dir` lists 2",
        ),
        ({"root": "a", "val_split_ratio": 1.0}, ValueError, "val_split_ratio"),
    ],
)
def test_invalid_arguments(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        AuxiliaryDataModule(**kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Integration with anomalib
# --------------------------------------------------------------------------------------------------------------------


def test_model_resize_is_applied_to_images_and_masks(mvtec_root: Path) -> None:
    datamodule = _setup(root=mvtec_root)
    dataset = datamodule.train_data
    AnomalibDataModule._update_subset_augmentations(dataset, None, Resize((40, 40)))
    index = int(np.flatnonzero(dataset.samples["label_index"].to_numpy() == 1)[0])
    item = dataset[index]
    assert item.image.shape == (3, 40, 40)
    assert item.gt_mask.shape == (40, 40)
    assert item.gt_mask.any()


def test_from_config_through_jsonargparse(tmp_path: Path, mvtec_root: Path, folder_root: Path) -> None:
    config = tmp_path / "data.yaml"
    config.write_text(
        "class_path: anomalib_anomalyclip.data.AuxiliaryDataModule\n"
        "init_args:\n"
        "  sources:\n"
        f"    - {{format: mvtec, root: {mvtec_root}}}\n"
        f"    - {{format: folder, root: {folder_root}, normal_dir: good, abnormal_dir: bad}}\n"
        "  train_batch_size: 3\n"
        "  num_workers: 0\n"
        "  val_split_ratio: 0.25\n"
    )
    datamodule = AnomalibDataModule.from_config(config)
    assert isinstance(datamodule, AuxiliaryDataModule)
    assert datamodule.train_batch_size == 3
    assert datamodule.val_split_ratio == 0.25
    datamodule.setup()
    assert len(datamodule.train_data) + len(datamodule.val_data) == len(_test_images(mvtec_root)) + 5


def test_typed_sources_and_plain_mappings_make_the_same_specification(mvtec_root: Path) -> None:
    typed = SourceSpec(format="mvtec", root=mvtec_root, categories="alpha")
    from_mapping = AuxiliaryDataModule(sources=[{"format": "mvtec", "root": str(mvtec_root), "categories": ["alpha"]}])
    assert AuxiliaryDataModule(sources=[typed]).sources == from_mapping.sources == (typed,)
    assert from_mapping.sources[0].categories == ("alpha",)
    assert from_mapping.sources[0].root == mvtec_root


def _anomalib_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    """Parse ``args`` with anomalib's CLI without running or instantiating anything: exit code and output."""
    from anomalib.cli import AnomalibCLI

    with pytest.raises(SystemExit) as exit_info:
        AnomalibCLI(list(args), run=False)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out + captured.err


def test_cli_rejects_an_unknown_source_format_listing_the_valid_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = ["--data", "anomalib_anomalyclip.data.AuxiliaryDataModule"]
    code, output = _anomalib_cli(
        capsys, "fit", "--model", "AnomalyCLIP", *data, "--data.sources", '[{"format": "xx", "root": "/tmp"}]'
    )
    assert code != 0
    assert "Got value: xx" in output
    assert "Literal['mvtec', 'visa', 'folder', 'synthetic']" in output
    config = tmp_path / "bad.yaml"
    config.write_text(
        "model: AnomalyCLIP\ndata:\n  class_path: anomalib_anomalyclip.data.AuxiliaryDataModule\n"
        "  init_args: {sources: [{format: mvtec, root: /tmp, mask: x}]}\n"
    )
    code, output = _anomalib_cli(capsys, "fit", "--config", str(config))
    assert code != 0
    assert "'mask'" in output and "not accepted" in output


@pytest.mark.parametrize("config", sorted((REPO_ROOT / "configs").glob("train_prompts_*.yaml")), ids=lambda p: p.name)
def test_shipped_training_configs_parse_their_sources(config: Path, capsys: pytest.CaptureFixture) -> None:
    code, output = _anomalib_cli(capsys, "fit", "--config", str(config), "--print_config")
    assert code == 0
    assert re.search(r"sources:\n\s*- format: (mvtec|visa)\n\s*root: \./datasets/", output)


def test_benchmark_configs_name_valid_sources() -> None:
    import yaml

    def sources(node: object) -> list:
        if isinstance(node, dict):
            return list(node.get("sources") or []) + [s for value in node.values() for s in sources(value)]
        return [s for value in node for s in sources(value)] if isinstance(node, list) else []

    found = [
        source
        for path in sorted((REPO_ROOT / "configs" / "benchmark").glob("*.yaml"))
        for source in sources(yaml.safe_load(path.read_text()))
    ]
    assert found
    for index, source in enumerate(found):
        assert isinstance(SourceSpec.from_mapping(source, index), SourceSpec)


def test_dataset_and_collate_pickle(datamodule: AuxiliaryDataModule) -> None:
    dataset = pickle.loads(pickle.dumps(datamodule.train_data))
    assert isinstance(dataset, AuxiliaryDataset)
    assert len(dataset) == len(datamodule.train_data)
    assert pickle.loads(pickle.dumps(dataset.collate_fn)) is dataset.collate_fn


def test_data_package_import_is_light() -> None:
    code = (
        "import sys, anomalib_anomalyclip.data as data; "
        "print(','.join(m for m in ('torch', 'anomalib', 'lightning') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert result.stdout.strip() == ""

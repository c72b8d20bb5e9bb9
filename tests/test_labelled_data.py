"""Tests of LabelledFolder, the zero-shot evaluation datamodule for datasets outside anomalib."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from anomalib_anomalyclip.data.labelled import LabelledFolder
from anomalib_anomalyclip.testing.toy_data import make_mvtec_like_dataset

N_GOOD, N_DEFECT, N_TRAIN = 3, 2, 2


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("labelled") / "mvtec"
    return make_mvtec_like_dataset(
        root, categories=("alpha", "beta"), image_size=32, n_train_good=N_TRAIN, n_test_good=N_GOOD,
        n_test_defect=N_DEFECT,
    )  # fmt: skip


def _setup(**kwargs: object) -> LabelledFolder:
    datamodule = LabelledFolder(num_workers=0, eval_batch_size=16, **kwargs)
    datamodule.setup()
    return datamodule


def test_mvtec_layout_tests_on_every_labelled_image_of_the_category(mvtec_root: Path) -> None:
    datamodule = _setup(root=mvtec_root, category="alpha")
    assert datamodule.category == "alpha"
    assert len(datamodule.test_data) == len(datamodule.val_data) == N_GOOD + N_DEFECT
    assert len(datamodule.train_data) == N_TRAIN
    assert set(datamodule.train_data.samples["label_index"]) == {0}
    batch = next(iter(datamodule.test_dataloader()))
    assert batch.gt_label.sum().item() == N_DEFECT
    assert batch.gt_mask[batch.gt_label.bool()].flatten(1).any(dim=1).all()  # every anomalous image has its mask
    assert all("/alpha/" in path for path in batch.image_path)


def test_missing_masks_are_allowed_unless_required(mvtec_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "no_masks"
    shutil.copytree(mvtec_root / "beta", root / "beta")
    shutil.rmtree(root / "beta" / "ground_truth")
    batch = next(iter(_setup(root=root, category="beta").test_dataloader()))
    assert batch.gt_label.sum().item() == N_DEFECT
    assert not batch.gt_mask.any()
    with pytest.raises(FileNotFoundError, match="no mask for anomalous image"):
        _setup(root=root, category="beta", require_masks=True)


def test_folder_layout_with_abnormal_images_and_masks_only(mvtec_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "colon"
    shutil.copytree(mvtec_root / "alpha" / "test" / "blob", root / "images")
    shutil.copytree(mvtec_root / "alpha" / "ground_truth" / "blob", root / "masks")
    datamodule = _setup(root=root, category="colon", abnormal_dir="images", mask_dir="masks", require_masks=True)
    assert datamodule.category == "colon"
    batch = next(iter(datamodule.test_dataloader()))
    assert bool(batch.gt_label.all())
    assert batch.gt_mask.flatten(1).any(dim=1).all()
    with pytest.raises(FileNotFoundError, match="folder layout has no training split"):
        datamodule.train_dataloader()


def test_folder_layout_names_the_category_after_the_root(mvtec_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "brain"
    shutil.copytree(mvtec_root / "alpha" / "test" / "good", root / "no")
    shutil.copytree(mvtec_root / "alpha" / "test" / "blob", root / "yes")
    datamodule = _setup(root=root, normal_dir="no", abnormal_dir="yes")
    assert datamodule.category == "brain"
    labels = torch.cat([batch.gt_label for batch in datamodule.test_dataloader()])
    assert sorted(labels.tolist()) == [False] * N_GOOD + [True] * N_DEFECT


def test_errors_name_what_is_missing(mvtec_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs `category`"):
        LabelledFolder(root=mvtec_root)
    with pytest.raises(ValueError, match=r"categories \['gamma'\] not found"):
        _setup(root=mvtec_root, category="gamma")
    shutil.copytree(mvtec_root / "alpha" / "test", tmp_path / "alpha" / "test")
    datamodule = _setup(root=tmp_path, category="alpha")
    with pytest.raises(FileNotFoundError, match="train/good/ is missing or empty"):
        datamodule.train_dataloader()

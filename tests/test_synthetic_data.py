"""Tests of the synthetic MVTec-layout dataset generator."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalib_anomalyclip.testing.toy_data import (
    ALL_DEFECT_KINDS,
    CATEGORY_KINDS,
    DEFAULT_CATEGORIES,
    DEFECT_KINDS,
    add_defect,
    category_style,
    main,
    make_mvtec_like_dataset,
    render_normal_image,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _relative_files(root: Path) -> set[str]:
    return {path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file()}


def _expected_files(categories: tuple[str, ...], defects: tuple[str, ...], counts: tuple[int, int, int]) -> set[str]:
    n_train, n_good, n_defect = counts
    files = set()
    for category in categories:
        files |= {f"{category}/train/good/{i:03d}.png" for i in range(n_train)}
        files |= {f"{category}/test/good/{i:03d}.png" for i in range(n_good)}
        for defect in defects:
            files |= {f"{category}/test/{defect}/{i:03d}.png" for i in range(n_defect)}
            files |= {f"{category}/ground_truth/{defect}/{i:03d}_mask.png" for i in range(n_defect)}
    return files


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "mvtec_like"
    return make_mvtec_like_dataset(
        root, image_size=32, n_train_good=2, n_test_good=3, n_test_defect=3, defects=DEFECT_KINDS
    )


def test_layout_is_mvtec_ad(dataset_root: Path) -> None:
    assert _relative_files(dataset_root) == _expected_files(DEFAULT_CATEGORIES, DEFECT_KINDS, (2, 3, 3))


def test_default_arguments(tmp_path: Path) -> None:
    root = make_mvtec_like_dataset(tmp_path / "data")
    assert root == tmp_path / "data"
    assert _relative_files(root) == _expected_files(("alpha", "beta", "gamma"), ("blob",), (4, 4, 4))
    assert _pixels(root / "alpha" / "test" / "blob" / "000.png").shape == (64, 64, 3)


def test_images_are_rgb_and_masks_binary_with_the_image_size(dataset_root: Path) -> None:
    for image_path in dataset_root.glob("*/*/*/*.png"):
        if image_path.parts[-3] == "ground_truth":
            continue
        with Image.open(image_path) as image:
            assert image.mode == "RGB"
            assert image.size == (32, 32)
    for mask_path in dataset_root.glob("*/ground_truth/*/*_mask.png"):
        with Image.open(mask_path) as mask:
            assert mask.mode == "L"
            assert mask.size == (32, 32)
        assert set(np.unique(_pixels(mask_path))) == {0, 255}


def test_masks_cover_the_painted_defects(dataset_root: Path) -> None:
    for mask_path in dataset_root.glob("*/ground_truth/*/*_mask.png"):
        category, _, defect, name = mask_path.relative_to(dataset_root).parts
        mask = _pixels(mask_path) > 0
        assert 0.02 <= mask.mean() <= 0.14, mask_path
        image = _pixels(dataset_root / category / "test" / defect / name.replace("_mask", "")) / 255.0
        inside = image[mask].mean()
        assert inside < 0.15 or inside > 0.85, f"defect of {mask_path} is not saturated: {inside:.2f}"


@pytest.mark.parametrize(
    ("kind", "size"),
    [(kind, size) for kind in DEFECT_KINDS for size in (16, 64, 128)]
    + [(kind, size) for kind in ("stain", "spots") for size in (32, 128)],  # a 16 px image holds a spot or two
)
def test_defect_coverage_is_a_few_percent(kind: str, size: int) -> None:
    rng = np.random.default_rng(0)
    coverages = []
    for _ in range(40):
        image = render_normal_image(category_style("alpha"), size, rng)
        defective, mask = add_defect(image, kind, rng)
        assert defective.shape == image.shape
        assert np.array_equal(defective[~mask], image[~mask])
        coverages.append(mask.mean())
    assert min(coverages) >= 0.02 and max(coverages) <= 0.16
    assert 0.04 <= float(np.mean(coverages)) <= 0.11


def test_counts_per_defect_kind_and_one_stain_colour_per_category(tmp_path: Path) -> None:
    counts = {"stain": 4, "spots": 1}
    root = make_mvtec_like_dataset(
        tmp_path, categories=("alpha",), image_size=48, n_test_defect=counts, defects=("blob", "stain", "spots")
    )
    for kind in ("blob", "stain", "spots"):
        assert len(list((root / "alpha" / "test" / kind).glob("*.png"))) == counts.get(kind, 0)
    colours = []
    for path in sorted((root / "alpha" / "test" / "stain").glob("*.png")):
        mask = _pixels(root / "alpha" / "ground_truth" / "stain" / f"{path.stem}_mask.png") > 0
        colours.append(_pixels(path)[mask].mean(0) / 255.0)
    assert np.ptp(np.stack(colours), axis=0).max() < 0.15  # the same contamination in every image
    with pytest.raises(ValueError, match="not in `defects`"):
        make_mvtec_like_dataset(tmp_path / "x", n_test_defect={"scratch": 1})
    with pytest.raises(ValueError, match="non-negative"):
        make_mvtec_like_dataset(tmp_path / "x", n_test_defect={"blob": -1})
    assert set(ALL_DEFECT_KINDS) >= {"blob", "scratch", "stain", "spots"}


def test_generation_is_deterministic(tmp_path: Path) -> None:
    kwargs = {"image_size": 32, "n_train_good": 1, "n_test_good": 1, "n_test_defect": 2}
    first = make_mvtec_like_dataset(tmp_path / "a", seed=3, **kwargs)
    second = make_mvtec_like_dataset(tmp_path / "b", seed=3, **kwargs)
    other = make_mvtec_like_dataset(tmp_path / "c", seed=4, **kwargs)
    files = sorted(_relative_files(first))
    assert files == sorted(_relative_files(second))
    assert all(np.array_equal(_pixels(first / name), _pixels(second / name)) for name in files)
    assert not all(np.array_equal(_pixels(first / name), _pixels(other / name)) for name in files)


def test_a_category_does_not_depend_on_the_other_categories(tmp_path: Path, dataset_root: Path) -> None:
    alone = make_mvtec_like_dataset(
        tmp_path / "alone", categories=("beta",), image_size=32, n_train_good=2, n_test_good=3, n_test_defect=3
    )
    for path in (alone / "beta").rglob("*.png"):
        assert np.array_equal(_pixels(path), _pixels(dataset_root / path.relative_to(alone)))


def test_categories_look_different(dataset_root: Path) -> None:
    means = {
        category: np.mean(
            [_pixels(path) for path in (dataset_root / category / "train" / "good").glob("*.png")], (0, 1, 2)
        )
        for category in DEFAULT_CATEGORIES
    }
    names = list(means)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            assert np.abs(means[first] - means[second]).max() > 5.0, (first, second)


@pytest.fixture(scope="module")
def kinds_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("kinds")
    kinds = {"alpha": "texture", "beta": "object", "gamma": "grayscale"}
    return make_mvtec_like_dataset(root, image_size=48, n_test_defect=6, defects=DEFECT_KINDS, kinds=kinds)


def test_kinds_leave_texture_categories_unchanged(kinds_root: Path, tmp_path: Path) -> None:
    plain = make_mvtec_like_dataset(
        tmp_path, categories=("alpha",), image_size=48, n_test_defect=6, defects=DEFECT_KINDS
    )
    for path in (plain / "alpha").rglob("*.png"):
        assert np.array_equal(_pixels(path), _pixels(kinds_root / path.relative_to(plain)))


def test_grayscale_category_is_single_channel(kinds_root: Path) -> None:
    for path in (kinds_root / "gamma").glob("*/*/*.png"):
        with Image.open(path) as image:
            assert image.mode == "L", path


def test_object_category_has_defects_on_the_object(kinds_root: Path) -> None:
    corners = np.zeros((48, 48), dtype=bool)
    corners[:6, :6] = corners[:6, -6:] = corners[-6:, :6] = corners[-6:, -6:] = True
    normal = [_pixels(path) / 255.0 for path in (kinds_root / "beta" / "train" / "good").glob("*.png")]
    background = np.mean([image[corners].mean(0) for image in normal], 0)
    for image in normal:  # plain background around the object
        assert np.abs(image[corners] - background).max() < 0.12
        assert np.abs(image[~corners] - background).max(-1).mean() > 0.1
    for mask_path in (kinds_root / "beta" / "ground_truth").glob("*/*_mask.png"):
        mask = _pixels(mask_path) > 0
        assert mask.mean() >= 0.01 and not (mask & corners).any(), mask_path


def test_unknown_kind_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape(f"choose from {list(CATEGORY_KINDS)}")):
        make_mvtec_like_dataset(tmp_path, kinds="wood")
    with pytest.raises(ValueError, match="not in `categories`"):
        make_mvtec_like_dataset(tmp_path, kinds={"delta": "object"})


def test_existing_category_needs_overwrite(tmp_path: Path) -> None:
    kwargs = {"categories": ("alpha",), "image_size": 16, "n_train_good": 1, "n_test_good": 1, "n_test_defect": 1}
    make_mvtec_like_dataset(tmp_path, **kwargs)
    stale = tmp_path / "alpha" / "test" / "good" / "999.png"
    stale.write_bytes(b"")
    with pytest.raises(FileExistsError, match="overwrite"):
        make_mvtec_like_dataset(tmp_path, **kwargs)
    make_mvtec_like_dataset(tmp_path, overwrite=True, **kwargs)
    assert not stale.exists()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"defects": ("dent",)}, "Unknown defect"),
        ({"defects": ()}, "defects"),
        ({"categories": ()}, "categories"),
        ({"categories": ("a", "a")}, "duplicates"),
        ({"image_size": 8}, "image_size"),
        ({"n_test_defect": -1}, "non-negative"),
    ],
)
def test_invalid_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_mvtec_like_dataset(tmp_path, **kwargs)


def test_main_writes_the_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(tmp_path), "--categories", "a", "b", "--image-size", "16", "--n-train-good", "1"]
    argv += ["--n-test-good", "1", "--n-test-defect", "2", "--defects", "scratch", "--seed", "1"]
    assert main([*argv, "--kinds", "object", "grayscale"]) == 0
    assert _relative_files(tmp_path) == _expected_files(("a", "b"), ("scratch",), (1, 1, 2))
    with Image.open(tmp_path / "b" / "train" / "good" / "000.png") as image:
        assert image.mode == "L"
    assert "Wrote 8 images in 2 categories" in capsys.readouterr().out


def test_module_entry_point_and_light_import(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "anomalib_anomalyclip.testing.toy_data", str(tmp_path), "--image-size", "16"]
    subprocess.run(command, check=True, capture_output=True, env=env)
    assert len(list(tmp_path.glob("*/test/blob/*.png"))) == 12
    code = (
        "import sys, anomalib_anomalyclip.testing.toy_data; "
        "print(','.join(m for m in ('torch', 'anomalib', 'lightning') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)
    assert result.stdout.strip() == ""

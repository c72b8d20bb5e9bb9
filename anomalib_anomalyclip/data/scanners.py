"""Listing the labelled images of one source, per format: :func:`scan_source`.

Every scanner returns rows in anomalib's column convention (:data:`SAMPLE_COLUMNS`) plus ``category`` and
``source``; ``mask_path`` is ``""`` where an image has no mask file. The layouts are described in
:mod:`~anomalib_anomalyclip.data.auxiliary`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from anomalib.data.utils import LabelName
from pandas import DataFrame

from anomalib_anomalyclip.data.anomaly_synthesis import synthetic_rows
from anomalib_anomalyclip.data.images import IMAGE_EXTENSIONS
from anomalib_anomalyclip.data.sources import SourceSpec

__all__ = ["NORMAL_LABEL", "SAMPLE_COLUMNS", "scan_source"]

NORMAL_LABEL = "good"
SAMPLE_COLUMNS: tuple[str, ...] = (
    "path",
    "split",
    "label",
    "label_index",
    "image_path",
    "mask_path",
    "category",
    "source",
)

_MVTEC_LAYOUT = "<root>/<category>/test/<good|defect>/<image> with masks <root>/<category>/ground_truth/<defect>/"
_VISA_CSV_COLUMNS = ("object", "split", "label", "image", "mask")


def _list_images(folder: Path, extensions: Iterable[str]) -> list[Path]:
    """Image files directly inside ``folder`` (sorted, hidden files skipped)."""
    extensions = tuple(extensions)
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file() and path.suffix.lower() in extensions and not path.name.startswith(".")
    )


def _list_subfolders(folder: Path) -> list[Path]:
    """Non-hidden sub-folders of ``folder``, sorted by name."""
    return sorted(path for path in folder.iterdir() if path.is_dir() and not path.name.startswith((".", "_")))


def _mask_extensions(spec: SourceSpec) -> tuple[str, ...]:
    """Extensions a mask may have: the source's image extensions and the common image formats."""
    return tuple(dict.fromkeys(spec.extensions + IMAGE_EXTENSIONS))


def _mask_index(mask_folders: Iterable[Path], extensions: Iterable[str]) -> dict[str, Path]:
    """Map image stems to mask files named ``<stem>.<ext>`` or ``<stem>_mask.<ext>``."""
    index: dict[str, Path] = {}
    for folder in mask_folders:
        if not folder.is_dir():
            continue
        for mask in _list_images(folder, extensions):
            index.setdefault(mask.stem, mask)
            if mask.stem.endswith("_mask"):
                index.setdefault(mask.stem.removesuffix("_mask"), mask)
    return index


def _find_mask(image: Path, masks: Mapping[str, Path], spec: SourceSpec, expected: Path, required: bool) -> str:
    """Mask path of an anomalous image, ``""`` when it has none and none is required."""
    mask = masks.get(image.stem)
    if mask is not None:
        return str(mask)
    if required:
        msg = (
            f"{spec.label}: no mask for anomalous image {image}; expected {expected / image.stem}.<ext> or "
            f"{expected / image.stem}_mask.<ext>. Add the mask, or set `require_masks: false` on this source to "
            "train such images with the image-level loss only."
        )
        raise FileNotFoundError(msg)
    return ""


def _record(spec: SourceSpec, category: str, label: str, image: Path, mask_path: str | None) -> dict[str, Any]:
    """One row of the samples table, in anomalib's column convention plus ``category`` and ``source``.

    ``mask_path`` marks the image as anomalous (``""`` for an anomalous image without a mask); ``None`` marks
    a normal image.
    """
    label_index = LabelName.NORMAL if mask_path is None else LabelName.ABNORMAL
    return {
        "path": str(spec.root),
        "split": "test",
        "label": label,
        "label_index": int(label_index),
        "image_path": str(image),
        "mask_path": mask_path or "",
        "category": category,
        "source": spec.index,
    }


def _check_root(spec: SourceSpec) -> None:
    if not spec.root.is_dir():
        what = "is not a directory" if spec.root.exists() else "does not exist"
        msg = (
            f"{spec.label}: root {spec.root} {what}. Check `root` (relative paths are resolved against the current "
            f"directory, {Path.cwd()})."
        )
        raise FileNotFoundError(msg)


def _scan_mvtec_category(spec: SourceSpec, category_dir: Path) -> list[dict[str, Any]]:
    """Records of the labelled test split of one MVTec-layout category."""
    test_dir = category_dir / "test"
    if not test_dir.is_dir():
        msg = (
            f"{spec.label}: category {category_dir.name!r} has no test split ({test_dir} is missing). Expected "
            f"{_MVTEC_LAYOUT}. Fix the layout or restrict the source with `categories: [...]`."
        )
        raise FileNotFoundError(msg)
    records = []
    for label_dir in _list_subfolders(test_dir):
        mask_dir = category_dir / "ground_truth" / label_dir.name
        normal = label_dir.name == NORMAL_LABEL
        masks = {} if normal else _mask_index([mask_dir], _mask_extensions(spec))
        for image in _list_images(label_dir, spec.extensions):
            mask_path = None if normal else _find_mask(image, masks, spec, mask_dir, spec.require_masks)
            records.append(_record(spec, category_dir.name, label_dir.name, image, mask_path))
    if not records:
        msg = (
            f"{spec.label}: no images with extensions {list(spec.extensions)} under {test_dir}/<good|defect>/. "
            f"Expected {_MVTEC_LAYOUT}."
        )
        raise FileNotFoundError(msg)
    return records


def _select_categories(spec: SourceSpec, found: Sequence[str], where: Path) -> list[str]:
    """The requested categories (all found ones by default), checked against those found."""
    if not found:
        msg = f"{spec.label}: no category folders in {where}. Expected {_MVTEC_LAYOUT}."
        raise FileNotFoundError(msg)
    if not spec.categories:
        return list(found)
    missing = sorted(set(spec.categories) - set(found))
    if missing:
        msg = f"{spec.label}: categories {missing} not found in {where}; available: {list(found)}."
        raise ValueError(msg)
    return list(spec.categories)


def _scan_mvtec(spec: SourceSpec, root: Path | None = None) -> list[dict[str, Any]]:
    """Records of every (selected) category of an MVTec-layout root."""
    root = root or spec.root
    categories = _select_categories(spec, [folder.name for folder in _list_subfolders(root)], root)
    return [record for category in categories for record in _scan_mvtec_category(spec, root / category)]


def _read_visa_csv(spec: SourceSpec, csv_path: Path) -> DataFrame:
    """The test rows of raw VisA's ``split_csv/1cls.csv``."""
    table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    missing = [column for column in _VISA_CSV_COLUMNS if column not in table.columns]
    if missing:
        msg = f"{spec.label}: {csv_path} lacks column(s) {missing}; expected {list(_VISA_CSV_COLUMNS)}."
        raise ValueError(msg)
    return table[table["split"] == "test"]


def _visa_mask(spec: SourceSpec, csv_path: Path, image: Path, mask: str) -> str:
    """Mask path of an anomalous raw-VisA image as listed in the split CSV (``""`` when allowed to be missing)."""
    mask_path = spec.root / mask if mask else None
    if mask_path is not None and mask_path.is_file():
        return str(mask_path)
    if mask_path is None and not spec.require_masks:
        return ""
    problem = f"mask {mask_path} does not exist" if mask_path is not None else "no mask is listed"
    msg = f"{spec.label}: {csv_path} lists anomalous image {image} but {problem}."
    if mask_path is None:
        msg += " Set `require_masks: false` on this source to train such images with the image-level loss only."
    raise FileNotFoundError(msg)


def _scan_visa_csv(spec: SourceSpec, csv_path: Path) -> list[dict[str, Any]]:
    """Records of the labelled test split of raw VisA, as listed by its split CSV."""
    table = _read_visa_csv(spec, csv_path)
    categories = _select_categories(spec, sorted(table["object"].unique()), csv_path)
    records = []
    for row in table[table["object"].isin(categories)].itertuples(index=False):
        image = spec.root / row.image
        if row.label == "normal":
            records.append(_record(spec, row.object, NORMAL_LABEL, image, None))
        else:
            records.append(_record(spec, row.object, "bad", image, _visa_mask(spec, csv_path, image, row.mask)))
    return records


def _looks_like_mvtec(root: Path) -> bool:
    return any((folder / "test").is_dir() for folder in _list_subfolders(root))


def _scan_visa(spec: SourceSpec) -> list[dict[str, Any]]:
    """Records of a VisA source in whichever of its layouts is found."""
    split_root = spec.root / "visa_pytorch"
    csv_path = spec.root / "split_csv" / "1cls.csv"
    if split_root.is_dir():
        return _scan_mvtec(spec, split_root)
    if csv_path.is_file():
        return _scan_visa_csv(spec, csv_path)
    if _looks_like_mvtec(spec.root):
        return _scan_mvtec(spec)
    msg = (
        f"{spec.label}: found neither {split_root} (anomalib's split of VisA), {csv_path} (the raw download) nor "
        f"category folders in MVTec layout ({_MVTEC_LAYOUT})."
    )
    raise FileNotFoundError(msg)


def _folder_dirs(spec: SourceSpec, names: Sequence[str], key: str) -> list[Path]:
    """Resolve ``normal_dir``/``abnormal_dir``/``mask_dir`` entries against the root; they must exist."""
    folders = [spec.root / name for name in names]
    for folder in folders:
        if not folder.is_dir():
            msg = f"{spec.label}: `{key}` folder {folder} does not exist (paths are relative to `root`)."
            raise FileNotFoundError(msg)
    return folders


def _scan_folder(spec: SourceSpec) -> list[dict[str, Any]]:
    """Records of a labelled folder source."""
    category = spec.display_name
    records = [
        _record(spec, category, NORMAL_LABEL, image, None)
        for folder in _folder_dirs(spec, spec.normal_dir, "normal_dir")
        for image in _list_images(folder, spec.extensions)
    ]
    mask_dirs = _folder_dirs(spec, spec.mask_dir, "mask_dir")
    for position, folder in enumerate(_folder_dirs(spec, spec.abnormal_dir, "abnormal_dir")):
        own_masks = mask_dirs if len(mask_dirs) <= 1 else [mask_dirs[position]]
        masks = _mask_index(own_masks, _mask_extensions(spec))
        expected = own_masks[0] if own_masks else folder
        for image in _list_images(folder, spec.extensions):
            mask_path = _find_mask(image, masks, spec, expected, spec.require_masks and bool(own_masks))
            records.append(_record(spec, category, folder.name, image, mask_path))
    return records


def _scan_synthetic(spec: SourceSpec) -> list[dict[str, Any]]:
    """Records of a synthetic source: its normal images and the anomalous images made from them."""
    rows = synthetic_rows(
        spec.label, spec.root, spec.synthetic, spec.normal_dir, spec.categories, spec.name, spec.extensions
    )
    return [_record(spec, category, label, image, mask) for category, label, image, mask in rows]


_SCANNERS: dict[str, Callable[[SourceSpec], list[dict[str, Any]]]] = {
    "mvtec": _scan_mvtec,
    "visa": _scan_visa,
    "folder": _scan_folder,
    "synthetic": _scan_synthetic,
}


def scan_source(spec: SourceSpec) -> DataFrame:
    """List the labelled images of one source.

    Args:
        spec: The source.

    Returns:
        Samples table with the columns :data:`SAMPLE_COLUMNS` (``mask_path`` is ``""`` where there is no mask).

    Raises:
        FileNotFoundError: If the root, a category's test split, a folder, an image or a required mask is missing,
            or the source holds no image.
    """
    _check_root(spec)
    records = _SCANNERS[spec.format](spec)
    if not records:
        msg = f"{spec.label}: no images with extensions {list(spec.extensions)} found."
        raise FileNotFoundError(msg)
    samples = DataFrame.from_records(records, columns=list(SAMPLE_COLUMNS))
    missing = [path for path in samples["image_path"] if not Path(path).is_file()]
    if missing:
        msg = f"{spec.label}: {len(missing)} listed image(s) do not exist, e.g. {missing[:3]}."
        raise FileNotFoundError(msg)
    return samples

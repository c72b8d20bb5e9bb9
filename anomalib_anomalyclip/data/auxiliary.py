"""Auxiliary labelled training data for AnomalyCLIP.

AnomalyCLIP learns its prompts once on an auxiliary *labelled* dataset (normal and anomalous images, with pixel masks
where available), e.g. the test split of every category of MVTec AD, and then detects anomalies zero-shot on other
datasets. anomalib's own train splits hold normal images only, so :class:`AuxiliaryDataModule` builds its training set
from the labelled test split of every category of one or more *sources*:

``mvtec``
    MVTec AD's layout ``root/<category>/test/<good|defect>/<image>`` with masks
    ``root/<category>/ground_truth/<defect>/<stem>[_mask].<ext>``. Every category folder below ``root`` is used
    unless ``categories`` lists some. MPDD, BTAD and anomalib's split VisA (``visa_pytorch``) share this layout.
``visa``
    VisA: anomalib's split copy (``root/visa_pytorch/...``, MVTec layout), the raw download (the test rows of
    ``root/split_csv/1cls.csv``), or ``root`` itself in MVTec layout.
``folder``
    A labelled folder: ``normal_dir`` and/or ``abnormal_dir`` (folder or list of folders, relative to ``root``) and an
    optional ``mask_dir``; the category name is ``name`` (default: the root folder's name).

Images without a pixel mask (a ``folder`` source without ``mask_dir``, or any source with ``require_masks: false``
whose anomalous image has no mask file) stay usable: their ``gt_mask`` is all zeros and their ``mask_path`` in the
batch is the empty string ``""``. A batch therefore says "anomalous image without a pixel annotation" through
``gt_label == 1 and mask_path == ""`` (see :func:`has_pixel_mask`); the zero masks of normal images are real
annotations.

Validation and test data: by default (``val_split_ratio=0``) the validation and test sets are the same labelled images
as the training set. The zero-shot protocol never evaluates on the auxiliary data; anomalib's Engine only needs a
validation pass to collect normalisation and threshold statistics, and those are best taken on labelled images that
hold both classes. With ``0 < val_split_ratio < 1`` that fraction of every (category, label) group is held out of
training instead (deterministic from ``seed``) and used for validation and test.

Example YAML (``anomalib fit --config ...``)::

    data:
      class_path: anomalib_anomalyclip.data.AuxiliaryDataModule
      init_args:
        sources:
          - {format: mvtec, root: ./datasets/MVTecAD}
          - {format: visa, root: ./datasets/visa, categories: [candle, pcb1]}
          - {format: folder, root: ./my_parts, normal_dir: good, abnormal_dir: bad, mask_dir: masks}
        train_batch_size: 8
        eval_batch_size: 8
        num_workers: 4
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from anomalib.data.dataclasses import ImageBatch, ImageItem
from anomalib.data.datamodules.base.image import AnomalibDataModule
from anomalib.data.datasets.base.image import AnomalibDataset
from anomalib.data.utils import LabelName
from pandas import DataFrame
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import Transform
from torchvision.tv_tensors import Image, Mask

from . import synthetic_anomalies as synthetic
from .images import (
    IMAGE_EXTENSIONS,
    BadImageError,
    check_files,
    image_size,
    normalise_extensions,
    read_image,
    read_mask,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "SOURCE_FORMATS",
    "AuxiliaryDataModule",
    "AuxiliaryDataset",
    "SourceSpec",
    "check_sample_files",
    "collate_auxiliary",
    "collect_samples",
    "has_pixel_mask",
    "scan_source",
]

logger = logging.getLogger(__name__)

SOURCE_FORMATS: tuple[str, ...] = ("mvtec", "visa", "folder", "synthetic")
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
_COMMON_KEYS = frozenset({"format", "root", "extensions", "require_masks"})
_FORMAT_KEYS: dict[str, frozenset[str]] = {
    "mvtec": frozenset({"categories"}),
    "visa": frozenset({"categories"}),
    "folder": frozenset({"name", "normal_dir", "abnormal_dir", "mask_dir"}),
    "synthetic": frozenset({"categories", "name", "normal_dir"}) | synthetic.SYNTHETIC_KEYS,
}
_VISA_CSV_COLUMNS = ("object", "split", "label", "image", "mask")


# --------------------------------------------------------------------------------------------------------------------
# Source specifications
# --------------------------------------------------------------------------------------------------------------------


def _as_tuple(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """Turn ``None``, a string or a sequence of strings into a tuple of strings."""
    if value is None:
        return ()
    if isinstance(value, str | os.PathLike):
        return (os.fspath(value),)
    return tuple(os.fspath(item) for item in value)


@dataclass(frozen=True)
class SourceSpec:
    """One labelled source of auxiliary images, parsed from a plain mapping.

    Attributes:
        format: One of :data:`SOURCE_FORMATS`.
        root: Dataset root (relative paths are relative to the current directory).
        index: Position of the source in the datamodule's ``sources`` (used in messages).
        categories: ``mvtec``/``visa``: categories to use; empty means every category found.
        name: ``folder``: category name of its images (default: the root folder's name).
        normal_dir: ``folder``: folders of normal images, relative to ``root``.
        abnormal_dir: ``folder``: folders of anomalous images, relative to ``root``.
        mask_dir: ``folder``: mask folders, relative to ``root``; one shared folder or one per ``abnormal_dir``.
        extensions: Image file extensions, lower case with a leading dot (masks may also have any of
            :data:`IMAGE_EXTENSIONS`).
        require_masks: If true, an anomalous image without a mask file is an error (except in a ``folder`` source
            without ``mask_dir``, whose images are labelled per image only); if false it is kept without a mask.
        synthetic: ``synthetic``: the options of the synthetic anomalies (see
            :mod:`~anomalib_anomalyclip.data.synthetic_anomalies`).
    """

    format: str
    root: Path
    index: int = 0
    categories: tuple[str, ...] = ()
    name: str = ""
    normal_dir: tuple[str, ...] = ()
    abnormal_dir: tuple[str, ...] = ()
    mask_dir: tuple[str, ...] = ()
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    require_masks: bool = True
    synthetic: synthetic.SyntheticOptions | None = None

    @property
    def label(self) -> str:
        """Short description used in messages, e.g. ``sources[0] (mvtec, ./datasets/MVTecAD)``."""
        return f"sources[{self.index}] ({self.format}, {self.root})"

    @classmethod
    def from_mapping(cls, spec: Mapping[str, Any], index: int = 0) -> SourceSpec:
        """Parse and check one source mapping.

        Args:
            spec: Mapping with at least ``format`` and ``root`` (see the module docstring for the other keys).
            index: Position of the source in the datamodule's ``sources``.

        Returns:
            The parsed specification.

        Raises:
            TypeError: If ``spec`` is not a mapping.
            ValueError: On a missing or unknown key, an unknown format or an invalid combination of keys.
        """
        if not isinstance(spec, Mapping):
            msg = (
                f"sources[{index}] must be a mapping such as {{format: mvtec, root: ./datasets/MVTecAD}}, got {spec!r}."
            )
            raise TypeError(msg)
        source_format = str(spec.get("format", "")).lower()
        if source_format not in SOURCE_FORMATS:
            msg = f"sources[{index}] needs `format` set to one of {list(SOURCE_FORMATS)}, got {spec.get('format')!r}."
            raise ValueError(msg)
        allowed = _COMMON_KEYS | _FORMAT_KEYS[source_format]
        unknown = sorted(set(spec) - allowed)
        if unknown:
            msg = f"sources[{index}] ({source_format}) has unknown key(s) {unknown}; allowed keys: {sorted(allowed)}."
            raise ValueError(msg)
        if not spec.get("root"):
            msg = f"sources[{index}] ({source_format}) needs a `root` path."
            raise ValueError(msg)
        parsed = cls(
            format=source_format,
            root=Path(os.path.abspath(Path(spec["root"]).expanduser())),
            index=index,
            categories=_as_tuple(spec.get("categories")),
            name=str(spec.get("name") or ""),
            normal_dir=_as_tuple(spec.get("normal_dir")),
            abnormal_dir=_as_tuple(spec.get("abnormal_dir")),
            mask_dir=_as_tuple(spec.get("mask_dir")),
            extensions=normalise_extensions(spec.get("extensions")),
            require_masks=bool(spec.get("require_masks", True)),
        )
        if source_format == "synthetic":
            parsed = replace(parsed, synthetic=synthetic.SyntheticOptions.from_mapping(spec, parsed.label))
        parsed._check_folder_keys()
        return parsed

    def _check_folder_keys(self) -> None:
        """Check the ``folder``-specific key combination.

        Raises:
            ValueError: If a folder source has neither ``normal_dir`` nor ``abnormal_dir``, or a ``mask_dir`` list
                that does not match ``abnormal_dir``.
        """
        if self.format != "folder":
            return
        if not self.normal_dir and not self.abnormal_dir:
            msg = f"{self.label} needs `normal_dir` and/or `abnormal_dir` (folders relative to `root`)."
            raise ValueError(msg)
        if len(self.mask_dir) > 1 and len(self.mask_dir) != len(self.abnormal_dir):
            msg = (
                f"{self.label}: `mask_dir` lists {len(self.mask_dir)} folders but `abnormal_dir` lists "
                f"{len(self.abnormal_dir)}; give one shared mask folder or one per abnormal folder."
            )
            raise ValueError(msg)

    @property
    def display_name(self) -> str:
        """Name of the source: the folder source's ``name``, else the root folder's name."""
        return self.name or self.root.name


# --------------------------------------------------------------------------------------------------------------------
# Scanning the file system
# --------------------------------------------------------------------------------------------------------------------


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
    rows = synthetic.synthetic_rows(
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


def _check_unique_images(samples: DataFrame) -> None:
    duplicated = samples.loc[samples["image_path"].duplicated(keep=False)]
    if not duplicated.empty:
        first = duplicated["image_path"].iloc[0]
        sources = sorted(set(duplicated.loc[duplicated["image_path"] == first, "source"]))
        msg = f"Image {first} is listed more than once (by sources {sources}); list each image in one source only."
        raise ValueError(msg)


def collect_samples(specs: Sequence[SourceSpec]) -> DataFrame:
    """Concatenate the labelled images of every source.

    Args:
        specs: The sources.

    Returns:
        Samples table sorted by ``image_path``, with ``attrs["task"]`` set to ``"segmentation"`` when any image has
        a mask, else ``"classification"``.

    Raises:
        ValueError: If no source is given or an image is listed twice.
    """
    if not specs:
        msg = "AuxiliaryDataModule needs at least one source, e.g. sources=[{format: mvtec, root: ./datasets/MVTecAD}]."
        raise ValueError(msg)
    samples = pd.concat([scan_source(spec) for spec in specs], ignore_index=True)
    _check_unique_images(samples)
    samples = samples.sort_values("image_path", ignore_index=True)
    samples.attrs["task"] = "segmentation" if (samples["mask_path"] != "").any() else "classification"
    return samples


def _mask_size_message(image_path: str, mask_path: str, image_wh: Sequence[int], mask_wh: Sequence[int]) -> str:
    return (
        f"Mask {mask_path} is {mask_wh[0]}x{mask_wh[1]} (WxH) but its image {image_path} is "
        f"{image_wh[0]}x{image_wh[1]}. Masks are never resized silently: fix or regenerate the mask so that it "
        "matches its image."
    )


def _sample_problem(paths: tuple[str, str]) -> str | None:
    """What is wrong with a labelled image and its mask (``""``: none), from their headers; ``None`` if nothing."""
    image_path, mask_path = paths
    try:
        image_wh = image_size(image_path)
        mask_wh = image_size(mask_path) if mask_path else image_wh
    except BadImageError as error:
        return str(error)
    return None if mask_wh == image_wh else _mask_size_message(image_path, mask_path, image_wh, mask_wh)


def check_sample_files(samples: DataFrame) -> None:
    """Check that every image and mask can be opened and every mask has its image's size.

    Only the file headers are read, so this is fast; all problems are listed in one error before training starts.

    Args:
        samples: Samples table as made by :func:`collect_samples`.

    Raises:
        BadImageError: If a file is not a readable image or a mask's size differs from its image's.
    """
    pairs = zip(samples["image_path"], samples["mask_path"], strict=True)
    check_files(pairs, _sample_problem, what="labelled images of AuxiliaryDataModule")


# --------------------------------------------------------------------------------------------------------------------
# Dataset and batches
# --------------------------------------------------------------------------------------------------------------------


def collate_auxiliary(items: list[ImageItem]) -> ImageBatch:
    """Collate items into an :class:`~anomalib.data.ImageBatch` with a complete ``mask_path`` list.

    anomalib's :meth:`ImageBatch.collate` keeps ``mask_path`` only if the first item has one and turns missing
    entries into ``"None"``. Here ``mask_path`` always has one string per image: the mask file, or ``""`` where the
    image has no mask file (normal images and anomalous images without pixel annotation).

    Args:
        items: Dataset items.

    Returns:
        The batch.
    """
    mask_paths = [item.mask_path or "" for item in items]
    batch = ImageBatch.collate(items)
    batch.mask_path = mask_paths
    return batch


def has_pixel_mask(batch: ImageBatch) -> torch.Tensor:
    """Which images of a batch have a real pixel annotation.

    Normal images' all-zero masks are real annotations; an anomalous image has one unless its ``mask_path`` is
    ``""`` (the convention of :class:`AuxiliaryDataModule`). Batches from anomalib's own datamodules, whose
    ``mask_path`` may be missing, count every image as annotated when ``gt_mask`` is present.

    Args:
        batch: A batch with ``gt_label`` and optionally ``gt_mask``/``mask_path``.

    Returns:
        Boolean tensor of shape ``(B,)`` on the labels' device.
    """
    labels = batch.gt_label.bool()
    if batch.gt_mask is None:
        return torch.zeros_like(labels)
    if batch.mask_path is None:
        return torch.ones_like(labels)
    missing = torch.tensor([path == "" for path in batch.mask_path], dtype=torch.bool, device=labels.device)
    return ~(labels & missing)


class AuxiliaryDataset(AnomalibDataset):
    """Labelled images (normal and anomalous, masks where available) from one or more sources.

    Items are :class:`~anomalib.data.ImageItem` exactly as anomalib's datasets make them: ``image`` float in
    ``[0, 1]`` (C, H, W), ``gt_label`` (0 normal, 1 anomalous), ``gt_mask`` (H, W), ``image_path``, ``mask_path``
    (``None`` at item level when there is no mask file; use :func:`collate_auxiliary` for batches). ``gt_mask`` is all
    zeros for normal images and for anomalous images without a mask. Images are read with
    :func:`~anomalib_anomalyclip.data.images.read_image` (16-bit, grayscale and transparent images converted
    deliberately). A mask whose size differs from its image's raises :class:`BadImageError` (a ``ValueError``) when
    the item is loaded: masks are never resized silently. :class:`AuxiliaryDataModule` checks every file before
    training.

    Args:
        samples: Samples table as made by :func:`collect_samples` (columns :data:`SAMPLE_COLUMNS`).
        augmentations: Transforms applied jointly to image and mask.
        regenerated: Anomalous images to make anew each time they are loaded: image path -> (the normal image it
            was made from, anomalib's anomaly generator); see :func:`synthetic.regeneration_plan`.
    """

    def __init__(
        self,
        samples: DataFrame,
        augmentations: Transform | None = None,
        regenerated: Mapping[str, tuple[str, Any]] | None = None,
    ) -> None:
        super().__init__(augmentations=augmentations)
        self.regenerated = dict(regenerated or {})
        missing = [column for column in SAMPLE_COLUMNS if column not in samples.columns]
        if missing:
            msg = f"AuxiliaryDataset samples lack column(s) {missing}; build them with collect_samples()."
            raise ValueError(msg)
        task = samples.attrs.get("task") or ("segmentation" if (samples["mask_path"] != "").any() else "classification")
        samples = samples.copy()
        samples.attrs["task"] = task
        self.samples = samples

    @property
    def categories(self) -> list[str]:
        """Sorted category names of the images."""
        return sorted(self.samples["category"].unique())

    @property
    def random_transforms(self) -> list[Any]:
        """The anomaly generators of the regenerated images (every load gives new pixels: no feature cache)."""
        return list({id(generator): generator for _, generator in self.regenerated.values()}.values())

    def __getitem__(self, index: int) -> ImageItem:
        """Load one labelled image with its mask.

        Args:
            index: Position in the samples table.

        Returns:
            The item.

        Raises:
            BadImageError: If the image or its mask cannot be read, or the mask does not have the image's size
                (a ``ValueError``).
        """
        row = self.samples.iloc[index]
        if row.image_path in self.regenerated:
            source, generator = self.regenerated[row.image_path]
            image, mask = synthetic.make_anomaly(generator, read_image(source))
            image, gt_mask = Image(image), Mask(mask)
        else:
            image = read_image(row.image_path)
            gt_mask = self._load_mask(row.image_path, row.mask_path, int(row.label_index), tuple(image.shape[-2:]))
        if self.augmentations:
            image, gt_mask = self.augmentations(image, gt_mask)
        return ImageItem(
            image=image,
            gt_mask=gt_mask,
            gt_label=torch.tensor(int(row.label_index)),
            image_path=row.image_path,
            mask_path=row.mask_path,
        )

    @staticmethod
    def _load_mask(image_path: str, mask_path: str, label_index: int, size: tuple[int, int]) -> Mask:
        """The image's mask, all zeros for normal images and for anomalous images without a mask file."""
        if label_index == LabelName.NORMAL or not mask_path:
            return Mask(torch.zeros(size, dtype=torch.uint8))
        mask = read_mask(mask_path)
        if tuple(mask.shape[-2:]) != size:
            raise BadImageError(_mask_size_message(image_path, mask_path, size[::-1], mask.shape[::-1]))
        return mask

    @property
    def collate_fn(self) -> Callable[[list[ImageItem]], ImageBatch]:
        """Collate function that keeps one ``mask_path`` string per image (see :func:`collate_auxiliary`)."""
        return collate_auxiliary


# --------------------------------------------------------------------------------------------------------------------
# Datamodule
# --------------------------------------------------------------------------------------------------------------------


def _held_out(samples: DataFrame, ratio: float, seed: int) -> np.ndarray:
    """Boolean mask of the rows held out for validation, stratified by (category, label)."""
    rng = np.random.default_rng(seed)
    held_out = np.zeros(len(samples), dtype=bool)
    for _, positions in sorted(samples.groupby(["category", "label_index"]).indices.items()):
        count = round(len(positions) * ratio)
        held_out[rng.permutation(positions)[:count]] = True
    return held_out


class AuxiliaryDataModule(AnomalibDataModule):
    """Train on the labelled test split of every category of one or more datasets.

    The training set concatenates, over all sources, every category's normal and anomalous test images (with masks
    where the source has them); see the module docstring for the source formats and the mask convention
    (``gt_label == 1 and mask_path == ""`` marks an anomalous image without pixel annotation).

    Validation and test sets: the same labelled images by default; with ``0 < val_split_ratio < 1`` that fraction
    of every (category, label) group is held out of training (chosen with ``seed``) and serves as both.

    Args:
        sources: Source mappings, e.g. ``[{"format": "mvtec", "root": "./datasets/MVTecAD"}]``. Keys: ``format``
            (``mvtec``, ``visa`` or ``folder``), ``root``, optional ``extensions`` and ``require_masks``;
            ``mvtec``/``visa``: optional ``categories``; ``folder``: ``normal_dir``, ``abnormal_dir``, optional
            ``mask_dir`` and ``name``.
        root: Shortcut for a single MVTec-layout source, ``sources=[{"format": "mvtec", "root": root}]``.
        train_batch_size: Training batch size.
        eval_batch_size: Validation/test batch size.
        num_workers: Data loader workers.
        train_augmentations: Augmentations of the training images (applied to image and mask).
        val_augmentations: Augmentations of the validation images.
        test_augmentations: Augmentations of the test images.
        augmentations: Augmentations for every subset without its own.
        val_split_ratio: Fraction held out for validation/test; ``0`` uses all images for training and evaluation.
        seed: Seed of the held-out split.

    Raises:
        ValueError: If neither or both of ``sources`` and ``root`` are given, a source mapping is invalid, or
            ``val_split_ratio`` is outside ``[0, 1)``.

    Example:
        >>> datamodule = AuxiliaryDataModule(root="./datasets/MVTecAD", train_batch_size=8)
        >>> datamodule.setup()
        >>> batch = next(iter(datamodule.train_dataloader()))
        >>> datamodule.class_names_for(batch.image_path)[:2]
        ['bottle', 'cable']
    """

    def __init__(
        self,
        sources: list[dict[str, Any]] | None = None,
        root: str | Path | None = None,
        train_batch_size: int = 8,
        eval_batch_size: int = 8,
        num_workers: int = 4,
        train_augmentations: Transform | None = None,
        val_augmentations: Transform | None = None,
        test_augmentations: Transform | None = None,
        augmentations: Transform | None = None,
        val_split_ratio: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__(
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            train_augmentations=train_augmentations,
            val_augmentations=val_augmentations,
            test_augmentations=test_augmentations,
            augmentations=augmentations,
            seed=seed,
        )
        if not 0.0 <= val_split_ratio < 1.0:
            msg = f"val_split_ratio must be in [0, 1), got {val_split_ratio}."
            raise ValueError(msg)
        self.val_split_ratio = val_split_ratio  # the base class turns 0 into 0.5
        self.sources = _parse_sources(sources, root)
        self.category = "+".join(dict.fromkeys(spec.display_name for spec in self.sources))
        self._labelled: DataFrame | None = None
        self._path_to_category: dict[str, str] | None = None

    @property
    def samples(self) -> DataFrame:
        """Every labelled image of every source (scanned and checked with :func:`check_sample_files` once)."""
        if self._labelled is None:
            self._labelled = collect_samples(self.sources)
            check_sample_files(self._labelled)
            self._log_summary(self._labelled)
        return self._labelled

    @property
    def categories(self) -> list[str]:
        """Sorted category names over all sources."""
        return sorted(self.samples["category"].unique())

    def _setup(self, _stage: str | None = None) -> None:
        """Build the train, validation and test datasets from the labelled images."""
        samples = self.samples
        if self.val_split_ratio > 0:
            held_out = _held_out(samples, self.val_split_ratio, self.seed)
            if held_out.all() or not held_out.any():
                msg = (
                    f"val_split_ratio={self.val_split_ratio} holds out {int(held_out.sum())} of {len(samples)} "
                    "images; choose a ratio that leaves images on both sides."
                )
                raise ValueError(msg)
            train, evaluation = samples[~held_out], samples[held_out]
        else:
            train, evaluation = samples, samples
        self.train_data = AuxiliaryDataset(train, regenerated=synthetic.regeneration_plan(self.sources, train))
        self.val_data = AuxiliaryDataset(evaluation)
        self.test_data = AuxiliaryDataset(evaluation)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches, in an order fixed by ``seed`` (anomalib's CLI does not seed runs)."""
        return DataLoader(
            dataset=self.train_data,
            shuffle=True,
            batch_size=self.train_batch_size,
            num_workers=self.num_workers,
            collate_fn=self.external_collate_fn or self.train_data.collate_fn,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _create_test_split(self) -> None:
        """Keep the test set built by :meth:`_setup` (the base class would drop its normal images)."""

    def _create_val_split(self) -> None:
        """Keep the validation set built by :meth:`_setup`."""

    def class_names_for(self, image_paths: Sequence[str | Path]) -> list[str]:
        """Category name of each image, for object-aware prompts.

        The category is the MVTec/VisA category folder, or a folder source's ``name``.

        Args:
            image_paths: Paths as found in ``batch.image_path`` (other spellings of the same file are accepted).

        Returns:
            One category name per path.

        Raises:
            KeyError: If a path is not an image of this datamodule's sources.
        """
        if self._path_to_category is None:
            self._path_to_category = dict(zip(self.samples["image_path"], self.samples["category"], strict=True))
        names = []
        for path in image_paths:
            name = self._path_to_category.get(str(path)) or self._path_to_category.get(os.path.abspath(path))
            if name is None:
                msg = f"{path} is not an image of this datamodule's sources ({self.category})."
                raise KeyError(msg)
            names.append(name)
        return names

    @staticmethod
    def _log_summary(samples: DataFrame) -> None:
        counts = samples.groupby("category")["label_index"].agg(["size", "sum"])
        without_mask = int(((samples["label_index"] == LabelName.ABNORMAL) & (samples["mask_path"] == "")).sum())
        logger.info(
            "Auxiliary data: %d images (%d anomalous, %d of them without mask) in %d categories: %s",
            len(samples),
            int(samples["label_index"].sum()),
            without_mask,
            len(counts),
            ", ".join(f"{name} {row['size']}/{row['sum']}" for name, row in counts.iterrows()),
        )


def _parse_sources(sources: Sequence[Mapping[str, Any]] | None, root: str | Path | None) -> tuple[SourceSpec, ...]:
    """Source specifications from the ``sources``/``root`` constructor arguments."""
    if (sources is None) == (root is None):
        msg = (
            "AuxiliaryDataModule needs exactly one of `sources` (a list such as "
            "[{format: mvtec, root: ./datasets/MVTecAD}]) or `root` (a single MVTec-layout dataset)."
        )
        raise ValueError(msg)
    if root is not None:
        sources = [{"format": "mvtec", "root": root}]
    if isinstance(sources, Mapping) or not sources:
        msg = f"`sources` must be a non-empty list of source mappings, got {sources!r}."
        raise ValueError(msg)
    return tuple(SourceSpec.from_mapping(spec, index) for index, spec in enumerate(sources))

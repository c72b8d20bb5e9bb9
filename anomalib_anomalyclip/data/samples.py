"""The samples table of a datamodule's sources, its file checks, and batches that say which images have a mask.

A batch made by :func:`collate_auxiliary` says "anomalous image without a pixel annotation" through
``gt_label == 1 and mask_path == ""``; :func:`has_pixel_mask` reads that convention (the loss uses it to skip the
pixel terms of such images).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from anomalib.data.dataclasses import ImageBatch, ImageItem
from pandas import DataFrame

from anomalib_anomalyclip.data.images import BadImageError, check_files, image_size
from anomalib_anomalyclip.data.scanners import scan_source
from anomalib_anomalyclip.data.sources import SourceSpec

__all__ = ["check_sample_files", "collate_auxiliary", "collect_samples", "has_pixel_mask", "mask_size_message"]


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


def mask_size_message(image_path: str, mask_path: str, image_wh: Sequence[int], mask_wh: Sequence[int]) -> str:
    """The error message for a mask whose size (width, height) differs from its image's."""
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
    return None if mask_wh == image_wh else mask_size_message(image_path, mask_path, image_wh, mask_wh)


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
# Batches
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

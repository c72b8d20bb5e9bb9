"""Where few-shot reference images come from, and how they are read.

References are normal images of the product: the normal images of a datamodule's train
split (what every anomalib datamodule provides), or a folder given by the user. They are
read like test images (the same reader, the test split's augmentations when the
datamodule has any) and then go through the model's pre-processor, normalisation
included.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from anomalib_anomalyclip.data.images import check_files, list_image_files, read_image

Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ReferenceSource:
    """Candidate reference images and how to read one.

    Attributes:
        paths: the normal images available.
        description: where they come from, for messages.
        augmentations: the test split's augmentations, applied before the pre-processor.
    """

    paths: Sequence[str]
    description: str
    augmentations: Transform | None = None


def folder_references(folder: str | Path) -> ReferenceSource:
    """The images of ``folder`` (and its sub-folders), all checked to be readable.

    Raises:
        FileNotFoundError: the folder does not exist.
        BadImageError: the folder holds no images, or some cannot be read (all listed).
    """
    paths = list_image_files(folder)
    check_files(paths, what=f"images in the few-shot source {folder}", fix="Remove or replace these files.")
    return ReferenceSource([str(path) for path in paths], f"the folder {folder}")


def datamodule_references(datamodule: object) -> ReferenceSource:
    """The normal images of the datamodule's train split.

    Raises:
        ValueError: the datamodule has no train split with image paths and labels.
    """
    name = type(datamodule).__name__
    samples = getattr(getattr(datamodule, "train_data", None), "samples", None)
    if samples is None or "image_path" not in getattr(samples, "columns", ()):
        raise ValueError(
            f"{name} has no train split with image paths to take few-shot references from. "
            "Give a folder of normal images with --model.few_shot.source."
        )
    if "label_index" in samples.columns:
        samples = samples[samples["label_index"] == 0]
    augmentations = getattr(getattr(datamodule, "test_data", None), "augmentations", None)
    return ReferenceSource(list(samples["image_path"]), f"the train split of {name}", augmentations)


def reference_source(folder: str | Path | None, datamodule: object | None, k_shot: int) -> ReferenceSource | None:
    """Where ``k_shot`` references come from: ``folder`` if given, else the datamodule's train split, else none.

    Args:
        folder: the ``few_shot.source`` argument.
        datamodule: the run's datamodule, if any.
        k_shot: the number of references (for messages).
    """
    if folder:
        return folder_references(folder)
    if getattr(datamodule, "train_data", None) is not None:
        return datamodule_references(datamodule)
    return None


def missing_references(k_shot: int) -> ValueError:
    """The error for a few-shot model with neither references nor a source of them."""
    return ValueError(
        f"k_shot={k_shot} needs normal reference images, but there is no datamodule with a train split. Give a "
        "folder of normal images with --model.few_shot.source, or --ckpt_path a checkpoint of a few-shot run (it "
        "holds the references)."
    )


def load_references(paths: Sequence[str], source: ReferenceSource, transform: Transform | None) -> torch.Tensor:
    """Read ``paths`` like test images and pre-process each on its own: (k, 3, H, W).

    Each image is resized by ``transform`` before stacking, so references of any size
    and colour mode (grayscale, 16-bit, RGBA: see :func:`.images.read_image`) work.
    """
    images = []
    for path in paths:
        image = read_image(path)
        if source.augmentations is not None:
            image = source.augmentations(image)
        batch = image.unsqueeze(0)
        images.append(transform(batch) if transform is not None else batch)
    return torch.cat(images)

r"""Predicting on a folder of one's own images.

``anomalib predict --data <folder>`` reads images with anomalib's own reader, which clips 16-bit images to white and
drops transparency (see :mod:`anomalib_anomalyclip.data.images`). :class:`PredictFolder` is the same job with this
package's reader, and it checks every file before the run starts, listing all unreadable ones at once::

    anomalib predict --model AnomalyCLIP --model.prompt_weights anomalyclip-mvtec \
        --data anomalib_anomalyclip.data.PredictFolder --data.path ./my_images

Sub-folders are searched too. Results go to ``results/AnomalyCLIP/PredictFolder/<folder name>/latest/``: overlays
under ``images/`` and one row per image in ``predictions.csv``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from anomalib.data.dataclasses import ImageBatch, ImageItem
from anomalib.data.datamodules.base.image import AnomalibDataModule
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import Transform

from anomalib_anomalyclip.data.images import (
    IMAGE_EXTENSIONS,
    check_files,
    image_problem,
    list_image_files,
    normalise_extensions,
    read_image,
)

__all__ = ["ImageFolderDataset", "PredictFolder"]

logger = logging.getLogger(__name__)


class ImageFolderDataset(Dataset):
    """Unlabelled images read with :func:`~anomalib_anomalyclip.data.images.read_image`.

    Args:
        paths: Image files.
        augmentations: Transform applied to each image (the datamodule sets the model's resize here).
    """

    def __init__(self, paths: Sequence[str | os.PathLike], augmentations: Transform | None = None) -> None:
        super().__init__()
        self.paths = [Path(path) for path in paths]
        self.augmentations = augmentations

    def __len__(self) -> int:
        """Number of images."""
        return len(self.paths)

    def __getitem__(self, index: int) -> ImageItem:
        """The image with its path (no label, no mask)."""
        path = self.paths[index]
        image = read_image(path)
        if self.augmentations is not None:
            image = self.augmentations(image)
        return ImageItem(image=image, image_path=str(path))

    @property
    def collate_fn(self) -> Callable[[list[ImageItem]], ImageBatch]:
        """Collation into an anomalib ``ImageBatch``."""
        return ImageBatch.collate


class PredictFolder(AnomalibDataModule):
    """Unlabelled images to predict on: a folder (and its sub-folders) or one image file.

    For ``anomalib predict`` only; there is nothing to train, validate or test on. Every file is decoded once before
    the run, so that all unreadable or truncated files are reported together (:class:`BadImageError` names each
    file), before any prediction is made.

    Args:
        path: Folder of images or one image file.
        eval_batch_size: Images per batch.
        num_workers: Data loader workers.
        extensions: Image file extensions (default: PNG, JPEG, BMP, TIFF and WebP).

    Raises:
        FileNotFoundError: If ``path`` does not exist (when the images are listed, in ``setup``).
        BadImageError: If the folder holds no image, or some files cannot be read (in ``setup``).

    Example:
        >>> from anomalib.engine import Engine
        >>> Engine().predict(model, datamodule=PredictFolder("./my_images"))  # doctest: +SKIP
    """

    def __init__(
        self,
        path: str | Path,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
    ) -> None:
        super().__init__(train_batch_size=eval_batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers)
        self.path = Path(path)
        self.extensions = normalise_extensions(extensions)
        # Names the results folder: results/<model>/PredictFolder/<folder name, or image file stem>/
        resolved = self.path.resolve()
        self.category = resolved.stem if resolved.suffix.lower() in self.extensions else resolved.name

    def _setup(self, _stage: str | None = None) -> None:
        """List and check the images (once)."""
        if getattr(self, "test_data", None) is not None:
            return
        paths = list_image_files(self.path, self.extensions)
        logger.info("Checking %d image(s) in %s", len(paths), self.path)
        check_files(paths, image_problem, what=f"images in {self.path}")
        # Kept as the test subset so that anomalib's datamodule adds the model's resize to its transforms.
        self.test_data = ImageFolderDataset(paths)

    def _create_test_split(self) -> None:
        """No split: every image is predicted on."""

    def _create_val_split(self) -> None:
        """No validation data."""

    def train_dataloader(self) -> DataLoader:
        """Nothing to train on (see :func:`_unlabelled`)."""
        _unlabelled()

    def val_dataloader(self) -> list:
        """No labelled data: the model keeps its thresholds (0.5 on the probability scale, or the checkpoint's)."""
        return []

    def test_dataloader(self) -> DataLoader:
        """Nothing to test on (see :func:`_unlabelled`)."""
        _unlabelled()

    def predict_dataloader(self) -> DataLoader:
        """The images, in path order."""
        return DataLoader(
            dataset=self.test_data,
            shuffle=False,
            batch_size=self.eval_batch_size,
            num_workers=self.num_workers,
            collate_fn=self.test_data.collate_fn,
        )


def _unlabelled() -> NoReturn:
    """Refuse to train or test on unlabelled images.

    Raises:
        ValueError: Always.
    """
    msg = (
        "PredictFolder holds unlabelled images for `anomalib predict`. To learn prompts, use "
        "anomalib_anomalyclip.data.AuxiliaryDataModule; to evaluate, an anomalib datamodule with labels."
    )
    raise ValueError(msg)

"""Zero-shot evaluation on every labelled image of one category, with or without pixel masks.

anomalib's ``Folder`` moves part of the normal images into the training split and ``MVTecAD`` needs a mask for every
anomalous image, but a zero-shot benchmark scores *all* labelled images of a category, and several of the datasets the
AnomalyCLIP paper reports have no masks (HeadCT, BrainMRI, Br35H, COVID-19) or no normal images (ISIC, CVC-ColonDB,
CVC-ClinicDB, Kvasir, Endo, TN3K). :class:`LabelledFolder` reads two layouts:

MVTec layout (``category`` given, no ``normal_dir``/``abnormal_dir``)::

    <root>/<category>/test/good/<image>                    normal test images (optional)
    <root>/<category>/test/<defect>/<image>                anomalous test images, any defect folder names
    <root>/<category>/ground_truth/<defect>/<stem>[_mask].<ext>   masks (optional, see ``require_masks``)
    <root>/<category>/train/good/<image>                   normal training images (optional; one-class models)

Folder layout (``normal_dir`` and/or ``abnormal_dir`` given, relative to ``root``; the category name is ``category``,
default the root folder's name)::

    <root>/<normal_dir>/<image>          normal images
    <root>/<abnormal_dir>/<image>        anomalous images (one folder or a list)
    <root>/<mask_dir>/<stem>[_mask].<ext>    masks (optional; one shared folder or one per abnormal folder)

Validation and test sets are the same labelled images (a zero-shot model's validation pass only collects
normalisation and threshold statistics). The training set holds the normal images of ``train/good`` in MVTec layout
and is empty otherwise, so zero-shot models run on any of these datasets and one-class models fail with a clear
message where there is nothing to train on.

Example YAML (``anomalib test --config ...``)::

    data:
      class_path: anomalib_anomalyclip.data.labelled.LabelledFolder
      init_args: {root: ./datasets/BrainMRI/brain_tumor_dataset, category: brain, normal_dir: "no", abnormal_dir: "yes"}
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from anomalib.data.datamodules.base.image import AnomalibDataModule
from pandas import DataFrame
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import Transform

from anomalib_anomalyclip.data.auxiliary import AuxiliaryDataset
from anomalib_anomalyclip.data.scanners import SAMPLE_COLUMNS, scan_source
from anomalib_anomalyclip.data.sources import SourceSpec

__all__ = ["LabelledFolder"]


class LabelledFolder(AnomalibDataModule):
    """Every labelled image of one category for zero-shot evaluation (see the module docstring for the layouts).

    Args:
        root: Dataset root.
        category: Category folder below ``root`` (MVTec layout) or the category's name (folder layout; default: the
            root folder's name). Zero-shot models use it as the object name (WinCLIP, object-aware prompts).
        normal_dir: Folder layout: folder(s) of normal images, relative to ``root``.
        abnormal_dir: Folder layout: folder(s) of anomalous images, relative to ``root``.
        mask_dir: Folder layout: mask folder(s), relative to ``root``.
        extensions: Image file extensions (case-insensitive); ``None``: the common image formats.
        require_masks: Raise when an anomalous image has no mask (MVTec layout, or folder layout with ``mask_dir``).
            ``False`` (default) keeps such images with an all-zero mask, which suits image-level datasets.
        train_batch_size: Training batch size (one-class models only).
        eval_batch_size: Validation/test batch size.
        num_workers: Data loader workers.
        train_augmentations: Augmentations of the training images.
        val_augmentations: Augmentations of the validation images.
        test_augmentations: Augmentations of the test images.
        augmentations: Augmentations for every subset without its own.
        seed: Seed kept for anomalib's interface (the splits are not random).

    Raises:
        ValueError: In MVTec layout without ``category``.
    """

    def __init__(
        self,
        root: str | Path,
        category: str | None = None,
        normal_dir: str | Sequence[str] | None = None,
        abnormal_dir: str | Sequence[str] | None = None,
        mask_dir: str | Sequence[str] | None = None,
        extensions: Sequence[str] | None = None,
        require_masks: bool = False,
        train_batch_size: int = 32,
        eval_batch_size: int = 32,
        num_workers: int = 8,
        train_augmentations: Transform | None = None,
        val_augmentations: Transform | None = None,
        test_augmentations: Transform | None = None,
        augmentations: Transform | None = None,
        seed: int | None = None,
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
        self.root = Path(root)
        self.folder_layout = bool(normal_dir or abnormal_dir)
        if not self.folder_layout and not category:
            msg = (
                "LabelledFolder needs `category` (a folder below `root` in MVTec layout), or `normal_dir`/"
                "`abnormal_dir` for the folder layout."
            )
            raise ValueError(msg)
        self.category = category or self.root.name
        common = {"root": str(self.root), "extensions": extensions, "require_masks": require_masks}
        if self.folder_layout:
            folders = {"normal_dir": normal_dir, "abnormal_dir": abnormal_dir, "mask_dir": mask_dir}
            spec = {"format": "folder", "name": self.category, **common, **folders}
        else:
            spec = {"format": "mvtec", "categories": [self.category], **common}
        self.source = SourceSpec.from_mapping({key: value for key, value in spec.items() if value is not None})

    @property
    def train_dir(self) -> Path | None:
        """Folder of normal training images (MVTec layout only)."""
        return None if self.folder_layout else self.root / self.category / "train" / "good"

    def _setup(self, _stage: str | None = None) -> None:
        """Scan the labelled images (validation = test) and the normal training images."""
        labelled = scan_source(self.source)
        self.test_data = AuxiliaryDataset(labelled)
        self.val_data = AuxiliaryDataset(labelled)
        self.train_data = AuxiliaryDataset(self._training_samples())

    def _training_samples(self) -> DataFrame:
        """Normal images of ``train/good`` when that folder exists, else an empty table."""
        train_dir = self.train_dir
        if train_dir is None or not train_dir.is_dir():
            return DataFrame(columns=list(SAMPLE_COLUMNS))
        spec = {"format": "folder", "root": str(train_dir.parent), "name": self.category, "normal_dir": "good"}
        extensions = self.source.extensions
        samples = scan_source(SourceSpec.from_mapping({**spec, "extensions": list(extensions)}))
        samples["split"] = "train"
        return samples

    def _create_test_split(self) -> None:
        """Keep every labelled image in the test set (the base class would split them)."""

    def _create_val_split(self) -> None:
        """Keep the validation set built by :meth:`_setup`."""

    def train_dataloader(self) -> DataLoader:
        """Normal training images, for one-class models.

        Raises:
            FileNotFoundError: If there are none (zero-shot models never ask for them).
        """
        if len(self.train_data) == 0:
            where = (
                f"{self.train_dir}/ is missing or empty"
                if self.train_dir
                else "the folder layout has no training split"
            )
            msg = (
                f"LabelledFolder has no normal training images for {self.category!r} ({where}). Zero-shot models need "
                "none; one-class models need normal images in <root>/<category>/train/good/ (MVTec layout)."
            )
            raise FileNotFoundError(msg)
        return super().train_dataloader()

    def __repr__(self) -> str:
        """Short description with the root and category."""
        return f"{type(self).__name__}(root={str(self.root)!r}, category={self.category!r})"

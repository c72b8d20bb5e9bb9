"""Data for AnomalyCLIP: the auxiliary labelled datamodule, prediction on a folder, image reading, synthetic data.

Importing this package is cheap: anomalib, torch and numpy are imported only when a public name is first accessed,
so ``anomalib_anomalyclip.data.AuxiliaryDataModule`` resolves (for jsonargparse and anomalib's CLI) without making
``import anomalib_anomalyclip.data`` heavy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from anomalib_anomalyclip._lazy import lazy_attributes

__all__ = [
    "AuxiliaryDataModule",
    "AuxiliaryDataset",
    "BadImageError",
    "ImageFolderDataset",
    "PredictFolder",
    "SourceSpec",
    "collate_auxiliary",
    "has_pixel_mask",
    "make_mvtec_like_dataset",
    "read_image",
    "read_mask",
]

# Public name -> module that defines it, resolved lazily by ``__getattr__``.
_LAZY_ATTRIBUTES: dict[str, str] = {
    "AuxiliaryDataModule": "anomalib_anomalyclip.data.auxiliary",
    "AuxiliaryDataset": "anomalib_anomalyclip.data.auxiliary",
    "SourceSpec": "anomalib_anomalyclip.data.sources",
    "collate_auxiliary": "anomalib_anomalyclip.data.samples",
    "has_pixel_mask": "anomalib_anomalyclip.data.samples",
    "make_mvtec_like_dataset": "anomalib_anomalyclip.testing.toy_data",
    "BadImageError": "anomalib_anomalyclip.data.images",
    "read_image": "anomalib_anomalyclip.data.images",
    "read_mask": "anomalib_anomalyclip.data.images",
    "ImageFolderDataset": "anomalib_anomalyclip.data.predict",
    "PredictFolder": "anomalib_anomalyclip.data.predict",
}

if TYPE_CHECKING:
    from anomalib_anomalyclip.data.auxiliary import AuxiliaryDataModule, AuxiliaryDataset
    from anomalib_anomalyclip.data.images import BadImageError, read_image, read_mask
    from anomalib_anomalyclip.data.predict import ImageFolderDataset, PredictFolder
    from anomalib_anomalyclip.data.samples import collate_auxiliary, has_pixel_mask
    from anomalib_anomalyclip.data.sources import SourceSpec
    from anomalib_anomalyclip.testing.toy_data import make_mvtec_like_dataset


__getattr__, __dir__ = lazy_attributes(globals(), _LAZY_ATTRIBUTES)

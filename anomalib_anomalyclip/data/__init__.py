"""Data for AnomalyCLIP: the auxiliary labelled datamodule and a synthetic MVTec-layout generator.

Importing this package is cheap: anomalib, torch and numpy are imported only when a public name is first accessed,
so ``anomalib_anomalyclip.data.AuxiliaryDataModule`` resolves (for jsonargparse and anomalib's CLI) without making
``import anomalib_anomalyclip.data`` heavy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "AuxiliaryDataModule",
    "AuxiliaryDataset",
    "collate_auxiliary",
    "has_pixel_mask",
    "make_mvtec_like_dataset",
]

# Public name -> module that defines it, resolved lazily by ``__getattr__``.
_LAZY_ATTRIBUTES: dict[str, str] = {
    "AuxiliaryDataModule": "anomalib_anomalyclip.data.auxiliary",
    "AuxiliaryDataset": "anomalib_anomalyclip.data.auxiliary",
    "collate_auxiliary": "anomalib_anomalyclip.data.auxiliary",
    "has_pixel_mask": "anomalib_anomalyclip.data.auxiliary",
    "make_mvtec_like_dataset": "anomalib_anomalyclip.data.synthetic",
}

if TYPE_CHECKING:
    from anomalib_anomalyclip.data.auxiliary import (
        AuxiliaryDataModule,
        AuxiliaryDataset,
        collate_auxiliary,
        has_pixel_mask,
    )
    from anomalib_anomalyclip.data.synthetic import make_mvtec_like_dataset


def __getattr__(name: str) -> Any:
    """Import public names on first access.

    Args:
        name: Attribute requested from the package.

    Returns:
        The requested object.

    Raises:
        AttributeError: If ``name`` is not a public name of this package.
    """
    module_name = _LAZY_ATTRIBUTES.get(name)
    if module_name is None:
        msg = f"module {__name__!r} has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """List module attributes, including the lazily imported public names."""
    return sorted(set(globals()) | set(__all__))

"""AnomalyCLIP for anomalib.

AnomalyCLIP (Zhou et al., ICLR 2024) performs zero-shot anomaly detection by learning
object-agnostic text prompts on top of a frozen CLIP model.

Importing this package is cheap: heavy dependencies (torch, open_clip, anomalib) are only
imported when a public name such as :class:`AnomalyCLIPModel` is first accessed.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from anomalib_anomalyclip._lazy import lazy_attributes
from anomalib_anomalyclip._registry import register

__version__ = "0.1.0"

__all__ = ["AnomalyCLIP", "AnomalyCLIPModel", "AuxiliaryDataModule", "ExportedAnomalyCLIP", "register"]

# Public name -> module that defines it, resolved lazily by ``__getattr__``.
_LAZY_ATTRIBUTES: dict[str, str] = {
    "AnomalyCLIP": "anomalib_anomalyclip.integration.lightning_model",
    "AnomalyCLIPModel": "anomalib_anomalyclip.method.torch_model",
    "AuxiliaryDataModule": "anomalib_anomalyclip.data.auxiliary",
    "ExportedAnomalyCLIP": "anomalib_anomalyclip.integration.exported_model",
}

if TYPE_CHECKING:
    from anomalib_anomalyclip.data.auxiliary import AuxiliaryDataModule
    from anomalib_anomalyclip.integration.exported_model import ExportedAnomalyCLIP
    from anomalib_anomalyclip.integration.lightning_model import AnomalyCLIP
    from anomalib_anomalyclip.method.torch_model import AnomalyCLIPModel


__getattr__, __dir__ = lazy_attributes(globals(), _LAZY_ATTRIBUTES)


def _register_now_or_later() -> None:
    """Register at once if anomalib's models are loaded, else when they are (see :mod:`._registry` and the hook)."""
    if "anomalib.models" in sys.modules:
        register()
        return
    try:
        import anomalib_anomalyclip_hook  # noqa: F401 - importing it installs the hook (once)
    except ImportError:  # running from a source tree that was never installed
        return


_register_now_or_later()

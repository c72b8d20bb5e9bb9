"""AnomalyCLIP for anomalib.

AnomalyCLIP (Zhou et al., ICLR 2024) performs zero-shot anomaly detection by learning
object-agnostic text prompts on top of a frozen CLIP model.

Importing this package is cheap: heavy dependencies (torch, open_clip, anomalib) are only
imported when a public name such as :class:`AnomalyCLIPModel` is first accessed.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING

from anomalib_anomalyclip._lazy import lazy_attributes

__version__ = "0.1.0"

__all__ = ["AnomalyCLIP", "AnomalyCLIPModel", "AuxiliaryDataModule", "ExportedAnomalyCLIP", "register"]

# Public name -> module that defines it, resolved lazily by ``__getattr__``.
_LAZY_ATTRIBUTES: dict[str, str] = {
    "AnomalyCLIP": "anomalib_anomalyclip.lightning_model",
    "AnomalyCLIPModel": "anomalib_anomalyclip.torch_model",
    "AuxiliaryDataModule": "anomalib_anomalyclip.data.auxiliary",
    "ExportedAnomalyCLIP": "anomalib_anomalyclip.exported_model",
}

# Our AnomalibModule subclasses, exposed to anomalib by ``register``.
_ANOMALIB_MODELS = ("AnomalyCLIP", "ExportedAnomalyCLIP")

if TYPE_CHECKING:
    from anomalib_anomalyclip.data.auxiliary import AuxiliaryDataModule
    from anomalib_anomalyclip.exported_model import ExportedAnomalyCLIP
    from anomalib_anomalyclip.lightning_model import AnomalyCLIP
    from anomalib_anomalyclip.torch_model import AnomalyCLIPModel


def register() -> None:
    """Make ``AnomalyCLIP`` (and ``ExportedAnomalyCLIP``) known to anomalib by short name.

    Imports the Lightning models (so that they are subclasses of ``AnomalibModule`` that
    the CLI and ``anomalib.models.get_model`` can find), exposes them as
    ``anomalib.models.AnomalyCLIP`` and ``anomalib.models.ExportedAnomalyCLIP``, and adds
    this package to the modules that ``get_model`` accepts full class paths from. Called
    automatically by the import hook that the package installs; calling it again does nothing.
    """
    models = sys.modules.get("anomalib.models") or importlib.import_module("anomalib.models")
    allowed = getattr(models, "ALLOWED_MODULES", None)
    if isinstance(allowed, set):
        allowed.update({__name__, *(_LAZY_ATTRIBUTES[name] for name in _ANOMALIB_MODELS)})
    for name in _ANOMALIB_MODELS:
        # Each module exposes its model when it has run; one being imported right now does so when it is complete.
        importlib.import_module(_LAZY_ATTRIBUTES[name])


def expose_in_anomalib(model_class: type) -> None:
    """Set ``anomalib.models.<name>`` so that anomalib's name look-ups accept the class."""
    # Through sys.modules: when called from the import hook, ``anomalib.models`` has run
    # but is not yet bound as an attribute of ``anomalib``.
    models = sys.modules.get("anomalib.models") or importlib.import_module("anomalib.models")
    setattr(models, model_class.__name__, model_class)


__getattr__, __dir__ = lazy_attributes(globals(), _LAZY_ATTRIBUTES)


def _register_now_or_later() -> None:
    """Register at once if anomalib's models are loaded, else when they are (see ``anomalib_anomalyclip_hook``)."""
    if "anomalib.models" in sys.modules:
        register()
        return
    try:
        import anomalib_anomalyclip_hook  # noqa: F401 - importing it installs the hook (once)
    except ImportError:  # running from a source tree that was never installed
        return


_register_now_or_later()

"""The one place that makes ``AnomalyCLIP`` and ``ExportedAnomalyCLIP`` known to anomalib.

anomalib has no plugin registry: its CLI and ``anomalib.models.get_model`` resolve a short model name among the
subclasses of ``AnomalibModule`` that are imported, and accept full class paths from the modules listed in
``anomalib.models.ALLOWED_MODULES``. :func:`register` imports our two models and exposes them as
``anomalib.models.AnomalyCLIP`` / ``anomalib.models.ExportedAnomalyCLIP``. It is called by the start-up hook
(``anomalib_anomalyclip_hook``, when ``anomalib.models`` finishes importing) and by ``import anomalib_anomalyclip``
when anomalib's models are loaded already. Kept light: nothing heavy is imported before :func:`register` runs.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["MODELS", "register"]

PACKAGE = "anomalib_anomalyclip"
MODELS: dict[str, str] = {
    "AnomalyCLIP": "anomalib_anomalyclip.lightning_model",
    "ExportedAnomalyCLIP": "anomalib_anomalyclip.exported_model",
}
"""Our ``AnomalibModule`` subclasses and the modules that define them."""


def register() -> None:
    """Make ``AnomalyCLIP`` and ``ExportedAnomalyCLIP`` known to anomalib by short name and class path.

    Calling it again does nothing new.
    """
    models = _anomalib_models()
    allowed = getattr(models, "ALLOWED_MODULES", None)
    if isinstance(allowed, set):
        allowed.update({PACKAGE, *MODELS.values()})
    for name, module_name in MODELS.items():
        module = sys.modules.get(module_name)
        if module is None or not hasattr(module, name):
            # A module being imported right now (this call comes from inside it) is completed by its importer.
            module = importlib.import_module(module_name)
        if hasattr(module, name):
            setattr(models, name, getattr(module, name))


def _anomalib_models() -> object:
    # Through sys.modules: when called from the import hook, ``anomalib.models`` has run but is not yet bound as an
    # attribute of ``anomalib``.
    return sys.modules.get("anomalib.models") or importlib.import_module("anomalib.models")

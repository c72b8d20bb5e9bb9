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

__all__ = ["MODELS", "expose", "is_our_class", "register"]

PACKAGE = "anomalib_anomalyclip"
MODELS: dict[str, str] = {
    "AnomalyCLIP": "anomalib_anomalyclip.integration.lightning_model",
    "ExportedAnomalyCLIP": "anomalib_anomalyclip.integration.exported_model",
}
"""Our ``AnomalibModule`` subclasses and the modules that define them."""


def register() -> None:
    """Make ``AnomalyCLIP`` and ``ExportedAnomalyCLIP`` known to anomalib by short name and class path.

    When a module of this package is being imported right now (``anomalib`` was first imported from inside it),
    the models are not imported here, which would meet that half-made module: each model module calls
    :func:`expose` at its end instead. Calling it again does nothing new.
    """
    _allow_class_paths()
    _install_patches()
    if _package_module_being_imported():
        return
    for name, module_name in MODELS.items():
        expose(getattr(importlib.import_module(module_name), name))


def expose(model_class: type) -> None:
    """Set ``anomalib.models.<name>`` so that anomalib's name look-ups find ``model_class``."""
    _allow_class_paths()
    _install_patches()
    setattr(_anomalib_models(), model_class.__name__, model_class)


def is_our_class(model_class: type) -> bool:
    """Whether ``model_class`` is one of this package's anomalib models."""
    return MODELS.get(model_class.__name__) == model_class.__module__


def _install_patches() -> None:
    """Our runs of anomalib's CLI and workspace (see :mod:`.cli.patches`); idempotent."""
    importlib.import_module(f"{PACKAGE}.cli.patches").install()


def _allow_class_paths() -> None:
    allowed = getattr(_anomalib_models(), "ALLOWED_MODULES", None)
    if isinstance(allowed, set):
        allowed.update({PACKAGE, *MODELS.values()})


def _package_module_being_imported() -> bool:
    """Whether a module of this package (not the package itself) is being executed by an import now."""
    prefix = f"{PACKAGE}."
    return any(
        name.startswith(prefix) and getattr(getattr(module, "__spec__", None), "_initializing", False)
        for name, module in list(sys.modules.items())
    )


def _anomalib_models() -> object:
    # Through sys.modules: when called from the import hook, ``anomalib.models`` has run but is not yet bound as an
    # attribute of ``anomalib``.
    return sys.modules.get("anomalib.models") or importlib.import_module("anomalib.models")

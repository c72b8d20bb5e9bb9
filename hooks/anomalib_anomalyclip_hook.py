"""Make ``--model AnomalyCLIP`` and ``get_model("AnomalyCLIP")`` work without touching anomalib.

anomalib has no plugin registry: its CLI resolves a short model name among the
subclasses of ``AnomalibModule`` that are imported when the arguments are parsed. This
module, imported from ``anomalib_anomalyclip.pth`` at interpreter start-up, installs a
tiny import hook, so that unrelated programs pay nothing measurable:

* when ``anomalib.models`` finishes importing (anomalib's CLI, its tools such as
  ``tools/inference/lightning_inference.py``, ``get_model``, user code), ``anomalib_anomalyclip``
  is imported and registered (``anomalib_anomalyclip._registry.register``), so that every place
  where anomalib resolves a model name sees the class before it looks;
* when ``anomalib`` itself is imported by the ``anomalib`` command, the warnings of anomalib's own
  imports are silenced if the command names AnomalyCLIP (``anomalib_anomalyclip.cli.logs.quiet_command_line``):
  they are printed before the model is known.

Only ``sys`` is imported and annotations are strings: ``typing`` would cost ~10 ms,
``importlib.abc`` ~25 ms and even ``__future__`` plus ``importlib.machinery`` ~0.8 ms at
every interpreter start-up (see ``benchmarks/startup.py``).
"""

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from importlib.abc import Loader
    from importlib.machinery import ModuleSpec
    from types import ModuleType

PACKAGE = "anomalib_anomalyclip"


def _register() -> None:
    registry = f"{PACKAGE}._registry"
    __import__(registry)
    sys.modules[registry].register()


def _quiet_anomalib_command() -> None:
    program = sys.argv[0].replace("\\", "/").rsplit("/", 1)[-1] if sys.argv else ""
    if program.split(".")[0] != "anomalib":
        return
    logs = f"{PACKAGE}.cli.logs"
    __import__(logs)
    sys.modules[logs].quiet_command_line(sys.argv[1:])


TRIGGERS = {"anomalib": _quiet_anomalib_command, "anomalib.models": _register}


class _RunAfterLoader:
    """Wraps a module's loader and runs an action once the module has executed."""

    def __init__(self, loader: "Loader", action: "Callable[[], None]") -> None:
        self._loader = loader
        self._action = action

    def create_module(self, spec: "ModuleSpec") -> "ModuleType | None":
        return self._loader.create_module(spec)

    def exec_module(self, module: "ModuleType") -> None:
        self._loader.exec_module(module)
        self._action()


class AfterImportFinder:
    """Meta-path finder that only answers for the trigger modules, and only to wrap their loaders."""

    def find_spec(  # noqa: D102 - the importlib.abc.MetaPathFinder protocol
        self, fullname: str, path: object = None, target: "ModuleType | None" = None
    ) -> "ModuleSpec | None":
        action = TRIGGERS.get(fullname)
        if action is None:
            return None
        spec = _path_finder().find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _RunAfterLoader(spec.loader, action)
        return spec


def _path_finder() -> type:
    """The standard path-based finder, taken from ``sys.meta_path`` (no importlib import)."""
    return next(finder for finder in sys.meta_path if getattr(finder, "__name__", "") == "PathFinder")


def install() -> None:
    """Install the finder once (idempotent)."""
    if not any(isinstance(finder, AfterImportFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, AfterImportFinder())


install()

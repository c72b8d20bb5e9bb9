"""Every change this package makes to anomalib's, Lightning's and jsonargparse's own code, in one place.

anomalib has no hooks for what an AnomalyCLIP run of its command line needs, so the few functions below wrap
methods of its classes. Each wrapper acts for this package's models only (``AnomalyCLIP``,
``ExportedAnomalyCLIP``) and leaves runs of other models as they were. Each patch says why it exists and what
would make it unnecessary upstream; ``tests/test_anomalib_patches.py`` fails when a patched function's signature
changes, so that an anomalib upgrade shows which patch to revisit.

What each run of the command line does with these hooks (the check before any work, the one-line errors, the
closing line) is :mod:`.support`'s; the quiet logs are :mod:`.logs`'.

:func:`install` applies the patches whatever was imported first; it runs from :func:`._registry.register` and
:func:`._registry.expose`, and again through the start-up hook when a patched module is imported later.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from anomalib_anomalyclip._registry import is_our_class

__all__ = ["PATCHED", "TRAINER_SETTINGS", "cut_training_to_one_batch", "install"]

CLI_MODULE = "anomalib.cli.cli"
ENGINE_MODULE = "anomalib.engine.engine"
_MARK = "_anomalyclip_patched"
_OURS = "_anomalyclip_run"

PATCHED: dict[str, tuple[str, str]] = {
    "cli arguments": (CLI_MODULE, "AnomalibCLI.__init__"),
    "cli steps": (CLI_MODULE, "AnomalibCLI.before_instantiate_classes"),
    "cli instantiate": (CLI_MODULE, "AnomalibCLI.instantiate_classes"),
    "cli run": (CLI_MODULE, "AnomalibCLI._run_subcommand"),
    "cli parse": (CLI_MODULE, "AnomalibCLI.init_parser"),
    "parser error": ("jsonargparse", "ArgumentParser.error"),
    "cli import order": ("anomalib.loggers", "configure_logger"),
    "versioned workspace": (ENGINE_MODULE, "Engine._setup_workspace"),
    "real latest folder": (ENGINE_MODULE, "create_versioned_dir"),
}
"""Each patch -> (module, qualified name) of the function it wraps (the signature test reads this)."""
TRAINER_SETTINGS = ("fit_loop.max_epochs", "limit_train_batches")
"""The trainer's settings that :func:`cut_training_to_one_batch` changes during a run (a test checks they exist)."""

_our_workspace: contextvars.ContextVar[bool] = contextvars.ContextVar("anomalyclip_workspace", default=False)


def install() -> None:
    """Apply every patch to the classes that are loaded; the others are patched when they load.

    * ``anomalib.cli.cli`` loaded: patch ``AnomalibCLI`` now; being imported (the ``anomalib`` command imports
      ``anomalib.models``, which registers this package, before the class is defined): anomalib's ``main`` calls
      ``configure_logger`` before building the CLI, so the patch waits in that function; not imported yet: the
      start-up hook calls :func:`install` again once it is.
    * ``anomalib.engine.engine`` alike: patched now when complete, else when the hook sees it imported or when a
      model module of this package finishes (:func:`._registry.expose`).
    """
    cli = sys.modules.get(CLI_MODULE)
    if cli is not None and hasattr(cli, "AnomalibCLI"):
        _patch_cli(cli.AnomalibCLI)
    elif cli is not None:
        _patch_configure_logger()
    else:
        _install_when_imported(CLI_MODULE)
    engine = sys.modules.get(ENGINE_MODULE)
    if engine is not None and hasattr(engine, "Engine"):
        _patch_engine(engine)
    elif engine is None:
        _install_when_imported(ENGINE_MODULE)


def _install_when_imported(module_name: str) -> None:
    hook = sys.modules.get("anomalib_anomalyclip_hook")
    if hook is not None and hasattr(hook, "TRIGGERS"):
        hook.TRIGGERS.setdefault(module_name, install)


def _patch_configure_logger() -> None:
    """Patch: ``anomalib.loggers.configure_logger`` also runs :func:`install`.

    Why: ``anomalib.cli.cli`` imports ``anomalib.models`` (which registers this package) before it defines
    ``AnomalibCLI``; its ``main`` calls ``configure_logger()`` right before ``AnomalibCLI()``, the first moment the
    class exists. Upstream fix: an entry point (plugin group) for models that anomalib's CLI loads after its own.
    """
    loggers = importlib.import_module("anomalib.loggers")
    original = loggers.configure_logger
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def configure_logger(*args: Any, **kwargs: Any) -> None:
        original(*args, **kwargs)
        install()

    setattr(configure_logger, _MARK, True)
    loggers.configure_logger = configure_logger


def _patch_cli(cli_class: type) -> None:
    """Patch: ``AnomalibCLI``'s parse, build and run steps call :mod:`.support` for this package's models.

    Its ``__init__`` first rewrites the short switches (``--model.mutual true``) and the flat arguments of earlier
    versions (``--model.mutual_pool_size``, and such keys in ``--config`` files) into the model's groups, printing
    one line per old name (:mod:`.arguments`): the parser is built and run inside ``__init__``, so nothing later
    can. Upstream fix for that part: none needed once the old spellings are dropped (a deprecation period).

    Why: anomalib's CLI has no hook before its classes are built (to check the run's files at once and adopt a
    checkpoint's CLIP), none around them (to print this package's errors once, without jsonargparse's union report
    and a traceback), none after the run (to say where the checkpoint went), and jsonargparse's report of an
    unknown model argument names no alternative and loses the program's name in its tip. Upstream fix: hooks in
    ``AnomalibCLI`` (``before_run``/``after_run``), models' errors passed through unwrapped, and "did you mean" in
    jsonargparse.
    """
    if getattr(cli_class, _MARK, False):
        return
    from anomalib_anomalyclip.cli import support as cli_support

    init, init_parser, before = cli_class.__init__, cli_class.init_parser, cli_class.before_instantiate_classes
    instantiate, run = cli_class.instantiate_classes, cli_class._run_subcommand

    @functools.wraps(init)
    def init_reading_old_arguments(self: Any, args: Sequence[str] | None = None, run: bool = True) -> None:
        from anomalib_anomalyclip.cli.arguments import upgrade_command_line

        upgraded, notes = upgrade_command_line(sys.argv[1:] if args is None else args)
        for note in notes:
            sys.stderr.write(f"AnomalyCLIP: {note}\n")
        init(self, upgraded, run)

    @functools.wraps(init_parser)
    def init_parser_reporting_typos(**kwargs: Any) -> Any:
        parser = init_parser(**kwargs)
        parser.error = functools.partial(cli_support.parse_error, parser, parser.error)
        return parser

    @functools.wraps(before)
    def before_instantiate_classes(self: Any) -> None:
        model_class = cli_support.run_model_class(self)
        setattr(self, _OURS, model_class is not None)
        with cli_support.reporting(getattr(self, _OURS)):
            if model_class is not None:
                cli_support.prepare_run(self, model_class)
        before(self)

    @functools.wraps(instantiate)
    def instantiate_classes(self: Any) -> None:
        with cli_support.reporting(getattr(self, _OURS, False)):
            instantiate(self)

    @functools.wraps(run)
    def _run_subcommand(self: Any) -> None:
        with cli_support.reporting(getattr(self, _OURS, False)):
            run(self)
        if getattr(self, _OURS, False):
            cli_support.report_outputs(self)

    cli_class.__init__ = init_reading_old_arguments
    cli_class.init_parser = staticmethod(init_parser_reporting_typos)
    cli_class.before_instantiate_classes = before_instantiate_classes
    cli_class.instantiate_classes = instantiate_classes
    cli_class._run_subcommand = _run_subcommand
    setattr(cli_class, _MARK, True)


def _patch_engine(engine_module: Any) -> None:
    """Patch: every ``test`` and ``predict`` of this package's models writes into a new version folder.

    Why: ``Engine.fit``/``train`` write into ``<root>/v<n>`` and point the link ``<root>/latest`` at it, but
    ``test`` and ``predict`` write into ``<root>/latest`` itself. AnomalyCLIP's first step is ``anomalib test``
    (zero-shot), which makes ``latest`` a real folder; the ``train`` after it then fails to make its link
    (``IsADirectoryError``) and leaves an empty ``v0/``, and a later ``test`` writes over the train run's
    ``config.yaml`` and overlays; successive ``predict`` runs pile their overlays up in one folder. Here both get
    ``versioned_dir=True``, and a real ``latest`` folder left by an earlier run becomes a version of its own
    before the link is made (:func:`_keep_real_latest`). Upstream fix: ``versioned_dir=True`` in ``Engine.test``
    and ``Engine.predict``, and ``create_versioned_dir`` that keeps a real ``latest`` folder as a version.
    """
    engine_class = engine_module.Engine
    if getattr(engine_class, _MARK, False):
        return
    original = engine_class._setup_workspace

    @functools.wraps(original)
    def _setup_workspace(self: Any, model: Any, *args: Any, **kwargs: Any) -> None:
        if not is_our_class(type(model)):
            original(self, model, *args, **kwargs)
            return
        kwargs["versioned_dir"] = True
        token = _our_workspace.set(True)
        try:
            original(self, model, *args, **kwargs)
        finally:
            _our_workspace.reset(token)

    engine_class._setup_workspace = _setup_workspace
    engine_module.create_versioned_dir = _keep_real_latest(engine_module.create_versioned_dir)
    setattr(engine_class, _MARK, True)


def _keep_real_latest(create_versioned_dir: Callable[[str | Path], Path]) -> Callable[[str | Path], Path]:
    """Patch: ``create_versioned_dir`` first turns a real ``latest`` folder into the next version (our runs only).

    Why and upstream fix: see :func:`_patch_engine`.
    """

    @functools.wraps(create_versioned_dir)
    def wrapper(root_dir: str | Path) -> Path:
        if _our_workspace.get():
            _archive_real_latest(Path(root_dir).resolve())
        return create_versioned_dir(root_dir)

    return wrapper


def _archive_real_latest(root_dir: Path) -> None:
    """Rename ``root_dir/latest`` to the next ``v<n>`` when it is a real folder (written by an older ``test``)."""
    from anomalib.utils.path import _highest_version_dir

    latest = root_dir / "latest"
    if latest.is_symlink() or not latest.is_dir():
        return
    highest = _highest_version_dir(root_dir)
    latest.rename(root_dir / f"v{int(highest[1:]) + 1 if highest else 0}")


def cut_training_to_one_batch(trainer: Any) -> None:
    """Patch: end a running fit's training loop after one batch, without a gradient step.

    Why: a ``fit`` of AnomalyCLIP whose data holds normal images only has no prompts to learn (the released ones are
    used, :mod:`.prompt_plan`), but anomalib's validation (thresholds) and checkpoint follow the training loop, and
    the trainer was already built with the model's ``max_epochs``; the loop's settings are lowered in the model's
    ``setup``, before the loop starts. Upstream fix: a way for a model to declare at ``setup`` that it has no training
    (Lightning's ``max_epochs=0`` skips validation and checkpointing too).
    """
    trainer.fit_loop.max_epochs = 1
    trainer.limit_train_batches = 1

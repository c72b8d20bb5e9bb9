"""AnomalyCLIP runs of anomalib's command line: one check first, errors printed once, quiet logs, stored CLIP.

anomalib's ``AnomalibCLI`` parses the arguments, builds the model and data (``instantiate_classes``), then runs the
engine (``_run_subcommand``). For runs of this package's models, :func:`install` wraps these steps:

* before anything is built (``before_instantiate_classes``): ``predict`` keeps no list of every batch's outputs
  unless ``--return_predictions true`` (:func:`keep_no_predictions`), the flooding library loggers are turned down
  (:mod:`.logs`), the network is probed once (:mod:`.network`), the CLIP that ``--ckpt_path``'s checkpoint was made
  with is put into the model's arguments where they were left at their defaults (so the model is built on it at
  once, and the saved ``config.yaml`` records it; :func:`adopt_stored_clip`), then everything the run lacks is
  listed in one message (:mod:`.preflight`);
* an :class:`.errors.AnomalyCLIPError` raised in any step (also inside jsonargparse's reports) is printed once to
  stderr, without a traceback, and the process exits with status 1.

Runs of other models are left as they are. anomalib has no hook for this: :func:`install` patches the class when it
exists, which depends on the import order (see there).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import logging
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import SETUP_ERRORS, AnomalyCLIPError, RunNotReadyError

__all__ = ["adopt_stored_clip", "install"]

CLI_MODULE = "anomalib.cli.cli"
CLIP_KEYS = ("backbone", "pretrained", "image_size")
_MARK = "_anomalyclip_support"
_OURS = "_anomalyclip_run"

logger = logging.getLogger(__name__)


def install() -> None:
    """Wrap ``AnomalibCLI``'s steps once, whatever was imported first.

    * ``anomalib.cli.cli`` is loaded: patch its class now;
    * it is being imported (the ``anomalib`` command: its imports load ``anomalib.models``, which registers this
      package, before the class is defined): its ``main`` calls ``configure_logger`` before building the CLI, so
      the patch waits in that function;
    * it is not imported yet: the start-up hook runs :func:`install` again once it is.
    """
    module = sys.modules.get(CLI_MODULE)
    if module is not None and hasattr(module, "AnomalibCLI"):
        _patch(module.AnomalibCLI)
    elif module is not None:
        _install_from_configure_logger()
    else:
        hook = sys.modules.get("anomalib_anomalyclip_hook")
        if hook is not None and hasattr(hook, "TRIGGERS"):
            hook.TRIGGERS.setdefault(CLI_MODULE, install)


def _install_from_configure_logger() -> None:
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


def _patch(cli_class: type) -> None:
    if getattr(cli_class, _MARK, False):
        return
    init, before, instantiate = cli_class.__init__, cli_class.before_instantiate_classes, cli_class.instantiate_classes
    run = cli_class._run_subcommand

    @functools.wraps(init)
    def __init__(self: Any, args: Sequence[str] | None = None, run: bool = True) -> None:  # noqa: N807
        from .cli_arguments import upgrade_command_line

        upgraded, notes = upgrade_command_line(sys.argv[1:] if args is None else args)
        for note in notes:
            sys.stderr.write(f"AnomalyCLIP: {note}\n")
        init(self, upgraded, run)

    def before_instantiate_classes(self: Any) -> None:
        model_class = _model_class(self)
        setattr(self, _OURS, model_class is not None)
        with _reporting(self):
            if model_class is not None:
                prepare_run(self, model_class)
        before(self)

    def instantiate_classes(self: Any) -> None:
        with _reporting(self):
            instantiate(self)

    def _run_subcommand(self: Any) -> None:
        with _reporting(self):
            run(self)

    cli_class.__init__ = __init__
    cli_class.before_instantiate_classes = before_instantiate_classes
    cli_class.instantiate_classes = instantiate_classes
    cli_class._run_subcommand = _run_subcommand
    setattr(cli_class, _MARK, True)


@contextlib.contextmanager
def _reporting(cli: Any) -> Iterator[None]:
    """Print an AnomalyCLIPError of one of our runs once, then exit with status 1 (no traceback)."""
    if not getattr(cli, _OURS, False):
        yield
        return
    SETUP_ERRORS["log"], SETUP_ERRORS["last"] = False, None
    try:
        yield
    except Exception as error:
        ours = _our_error(error)
        if ours is None:
            raise
        sys.stderr.write(f"ERROR: {ours}\n")
        sys.stderr.flush()
        raise SystemExit(1) from None
    finally:
        SETUP_ERRORS["log"] = True


def _our_error(error: BaseException) -> AnomalyCLIPError | None:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, AnomalyCLIPError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    last = SETUP_ERRORS["last"]
    return last if isinstance(last, AnomalyCLIPError) else None


def _model_class(cli: Any) -> type | None:
    """The model class of the run if it is one of ours, else ``None``."""
    config = cli.config.get(str(cli.config.get("subcommand")), cli.config)
    model = config.get("model") if hasattr(config, "get") else None
    class_path = getattr(model, "class_path", None)
    if not isinstance(class_path, str):
        return None
    found = _import_class(class_path)
    from ._registry import MODELS

    return found if found is not None and found.__name__ in MODELS and found.__module__ in MODELS.values() else None


def _import_class(class_path: str) -> type | None:
    module_name, _, name = class_path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return None
    return found if isinstance(found, type) else None


def prepare_run(cli: Any, model_class: type) -> None:
    """Quiet logs, offline switches, the checkpoint's CLIP and the one check (see the module's description).

    Raises:
        CheckpointFileError: ``--ckpt_path`` is not a checkpoint of this model.
        RunNotReadyError: the run lacks files; the message lists all of them.
    """
    from .logs import quiet_library_logs
    from .network import settle_offline_mode

    quiet_library_logs()
    subcommand = str(cli.config["subcommand"])
    config = cli.config[subcommand]
    keep_no_predictions(subcommand, config)
    if model_class.__name__ != "AnomalyCLIP":
        return
    online = settle_offline_mode()
    init_args = config["model"].init_args
    problems = []
    ckpt_path = config.get("ckpt_path")
    if ckpt_path:
        problems += _adopt_checkpoint_clip(model_class, init_args, str(ckpt_path))
    problems += _missing(subcommand, config, init_args, ckpt_path, online, check_clip=not problems)
    if problems:
        from .preflight import format_report

        raise RunNotReadyError(format_report(problems))


def keep_no_predictions(subcommand: str, config: Any) -> None:
    """``predict`` of this package's models returns no list of every batch's outputs unless asked for.

    The predictions go to ``predictions.csv`` and the overlays as batches finish (:class:`.PredictionCsvWriter`);
    Lightning's returned list would hold every image and map of the run in memory until the end. An explicit
    ``--return_predictions true`` keeps them.
    """
    if subcommand == "predict" and hasattr(config, "get") and config.get("return_predictions") is None:
        config["return_predictions"] = False


def _adopt_checkpoint_clip(model_class: type, init_args: Any, ckpt_path: str) -> list[str]:
    from .checkpoints import read_checkpoint_file, stored_clip

    checkpoint = read_checkpoint_file(ckpt_path, model_class.checkpoint_safe_globals())
    defaults = {
        name: parameter.default for name, parameter in inspect.signature(model_class.__init__).parameters.items()
    }
    return adopt_stored_clip(init_args, stored_clip(checkpoint), defaults, ckpt_path)


def adopt_stored_clip(
    model_args: Any, stored: Mapping[str, Any], defaults: Mapping[str, Any], source: str
) -> list[str]:
    """Put the checkpoint's CLIP into ``model_args`` where they hold the defaults; the problems found.

    A value given that differs from the checkpoint's is kept, with a warning. A stored weights file that is not
    there any more is a problem that names the stored path and the option to give the new one; a file given whose
    SHA-256 differs from the stored one gets a warning.

    Args:
        model_args: the model's init arguments (a mapping or a jsonargparse namespace), changed in place.
        stored: what the checkpoint records (:func:`.checkpoints.stored_clip`).
        defaults: the model's default arguments.
        source: the checkpoint file, for the messages.
    """
    from .backbone import file_sha256, is_weights_file

    for key in CLIP_KEYS:
        if key not in stored:
            continue
        given = model_args[key]
        if given == defaults.get(key):
            model_args[key] = stored[key]
        elif given != stored[key]:
            logger.warning("--model.%s %s differs from %s's %s; using %s.", key, given, source, stored[key], given)
    pretrained = model_args["pretrained"]
    if not is_weights_file(pretrained):
        return []
    path = Path(str(pretrained)).expanduser()
    if not path.is_file():
        if str(pretrained) != str(stored.get("pretrained")):
            return []  # a wrong file given by the user: reported by the check of the CLIP weights
        return [
            f"the CLIP weights: the checkpoint '{source}' was made with '{pretrained}', which is not there any more. "
            f"Give its new location with --model.pretrained /new/path/{path.name}"
        ]
    if stored.get("sha256") and file_sha256(path) != stored["sha256"]:
        logger.warning("CLIP weights '%s' differ from those %s was made with (SHA-256 differs).", path, source)
    return []


def _missing(subcommand: str, config: Any, init_args: Any, ckpt_path: Any, online: bool, check_clip: bool) -> list[str]:
    from .preflight import RunRequest, missing_pieces

    data = config.get("data")
    data_class = _import_class(data.class_path) if hasattr(data, "class_path") else None
    if data_class is not None:
        data = dict(vars(data.init_args)) if getattr(data, "init_args", None) is not None else {}
    elif data is not None and not isinstance(data, str | Path):
        data = None
    request = RunRequest(subcommand, dict(vars(init_args)), data_class, data, str(ckpt_path) if ckpt_path else None)
    return missing_pieces(request, online, check_clip)

"""AnomalyCLIP runs of anomalib's command line: one check first, errors printed once, quiet logs, stored CLIP.

anomalib's ``AnomalibCLI`` parses the arguments, builds the model and data (``instantiate_classes``), then runs the
engine (``_run_subcommand``). For runs of this package's models, :mod:`.cli.patches` wraps these steps with
the functions here:

* an unknown model argument (``--model.mutual_scorng``) is answered by one line that names the closest ones
  (:func:`parse_error`);
* before anything is built (:func:`prepare_run`): ``predict`` keeps no list of every batch's outputs unless
  ``--return_predictions true`` (:func:`keep_no_predictions`), the library loggers and warnings are turned down
  (:mod:`.logs`), the network is probed once (:mod:`.network`), the CLIP that ``--ckpt_path``'s checkpoint was
  made with is put into the model's arguments where they were left at their defaults (so the model is built on it
  at once, and the saved ``config.yaml`` records it; :func:`adopt_stored_clip`), then everything the run lacks is
  listed in one message (:mod:`.preflight`);
* an :class:`.errors.AnomalyCLIPError` raised in any step (also inside jsonargparse's reports) is printed once to
  stderr, without a traceback, and the process exits with status 1 (:func:`reporting`);
* after ``fit``/``train``, the checkpoint's path is printed (:func:`report_outputs`).

Runs of other models are left as they are.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import logging
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, NoReturn

from anomalib_anomalyclip._registry import is_our_class
from anomalib_anomalyclip.errors import SETUP_ERRORS, AnomalyCLIPError, RunNotReadyError

__all__ = ["adopt_stored_clip", "parse_error", "prepare_run", "report_outputs", "reporting", "run_model_class"]

CLIP_KEYS = ("backbone", "pretrained", "image_size")
FITTING = {"fit", "train"}
_UNKNOWN_OPTION = re.compile(
    r"Problem with given class_path '(?P<class_path>[\w.]+)':\s*(?:Option|Key) '(?P<name>[\w.]+)' is not "
    r"(?:accepted|expected)"
)

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def reporting(ours: bool) -> Iterator[None]:
    """Print an AnomalyCLIPError of one of our runs (``ours``) once, then exit with status 1 (no traceback)."""
    if not ours:
        yield
        return
    SETUP_ERRORS["log"], SETUP_ERRORS["last"] = False, None
    try:
        yield
    except Exception as error:
        found = _our_error(error)
        if found is None:
            raise
        sys.stderr.write(f"ERROR: {found}\n")
        sys.stderr.flush()
        raise SystemExit(1) from None
    finally:
        SETUP_ERRORS["log"] = True


def parse_error(parser: Any, original: Callable[..., NoReturn], message: str, ex: Exception | None = None) -> NoReturn:
    """The argument parser's error of a run that names one of our models: one line with the closest arguments.

    Other errors of such runs go to jsonargparse's own report, with the program's name restored in its tip line (a
    subcommand's parser is named ``" [options] test"``, so the tip read ``run:  test --help``).

    Args:
        parser: the parser reporting the error (the CLI's or a subcommand's).
        original: that parser's own ``error`` method.
        message: jsonargparse's report.
        ex: the exception behind it.
    """
    from anomalib_anomalyclip.cli.logs import names_anomalyclip

    reporting_parser = getattr(ex, "subcommand_parser", None) or parser
    subcommand = reporting_parser.prog.split()[-1] if reporting_parser.prog.split() else "test"
    unknown = _UNKNOWN_OPTION.search(message)
    model_class = _import_class(unknown["class_path"]) if unknown else None
    if unknown and model_class is not None and is_our_class(model_class):
        sys.stderr.write(f"ERROR: {unknown_argument_message(model_class, unknown['name'], subcommand)}\n")
        sys.stderr.flush()
        raise SystemExit(2)
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "anomalib"
    if names_anomalyclip(sys.argv[1:]) and not reporting_parser.prog.strip().startswith(program):
        reporting_parser.prog = f"{program} {reporting_parser.prog.strip()}"
    original(message, ex)


def unknown_argument_message(model_class: type, name: str, subcommand: str) -> str:
    """One line for ``--model.<name>``, which ``model_class`` does not take: the closest names and where to look."""
    candidates = _argument_names(model_class)
    shown: dict[str, str] = {}  # new name -> how it is shown (an old name and its new one: once)
    for match in difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6):
        new = candidates[match]
        shown.setdefault(new, f"--model.{new}" if match == new else f"--model.{new} (formerly --model.{match})")
    suggestion = f" Did you mean {' or '.join(shown.values())}?" if shown else ""
    return (
        f"--model.{name} is not an argument of {model_class.__name__}.{suggestion} All model arguments: "
        f"anomalib {subcommand} --model.help {model_class.__name__}"
    )


def _argument_names(model_class: type) -> dict[str, str]:
    """Every name ``--model.<name>`` may take (groups' fields and old flat names included) -> its current name."""
    from anomalib_anomalyclip.config import FLAT_ARGUMENTS, GROUPS

    names: dict[str, str] = {}
    ours = model_class.__name__ == "AnomalyCLIP"
    for parameter in inspect.signature(model_class.__init__).parameters:
        if parameter == "self":
            continue
        names[parameter] = parameter
        if ours and parameter in GROUPS:
            names.update({f"{parameter}.{item.name}": f"{parameter}.{item.name}" for item in fields(GROUPS[parameter])})
    if ours:
        names.update({old: new for old, new in FLAT_ARGUMENTS.items() if old not in names})
    return names


def report_outputs(cli: Any) -> None:
    """After ``fit``/``train``: print where the checkpoint was written (anomalib does not say)."""
    if str(cli.config.get("subcommand")) not in FITTING:
        return
    path = getattr(getattr(cli, "engine", None), "best_model_path", None)
    if path:
        logger.info("Checkpoint written to %s", path)


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


def run_model_class(cli: Any) -> type | None:
    """The model class of the CLI's run if it is one of ours, else ``None``."""
    config = cli.config.get(str(cli.config.get("subcommand")), cli.config)
    model = config.get("model") if hasattr(config, "get") else None
    class_path = getattr(model, "class_path", None)
    if not isinstance(class_path, str):
        return None
    found = _import_class(class_path)
    return found if found is not None and is_our_class(found) else None


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
    from anomalib_anomalyclip.cli.logs import quiet_library_logs
    from anomalib_anomalyclip.cli.network import settle_offline_mode

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
        from anomalib_anomalyclip.cli.preflight import format_report

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
    from anomalib_anomalyclip.integration.checkpoints import read_checkpoint_file, stored_clip

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
    from anomalib_anomalyclip.method.backbone import file_sha256, is_weights_file

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
    from anomalib_anomalyclip.cli.preflight import RunRequest, missing_pieces

    data = config.get("data")
    data_class = _import_class(data.class_path) if hasattr(data, "class_path") else None
    if data_class is not None:
        data = dict(vars(data.init_args)) if getattr(data, "init_args", None) is not None else {}
    elif data is not None and not isinstance(data, str | Path):
        data = None
    request = RunRequest(subcommand, dict(vars(init_args)), data_class, data, str(ckpt_path) if ckpt_path else None)
    return missing_pieces(request, online, check_clip)

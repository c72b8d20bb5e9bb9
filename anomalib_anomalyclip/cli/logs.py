"""Quiet command-line runs: what the user needs, not hundreds of library INFO lines, warnings and tips.

An ``anomalib export`` prints hundreds of INFO lines of the ONNX/OpenVINO tool chain (one per optimisation pass or
node), and anomalib's logging set-up prints every record twice (a plain and a rich handler on the root logger).
Every run also printed lines that are not about the user's input: timm's and anomalib's ``FutureWarning`` of their
own imports (with their source lines), Lightning's deprecations, its "GPU available"/"TPU available" lines, its
litlogger tip, its note that the model's callbacks override the trainer's, and anomalib's "Overriding max_epochs"
and "ckpt_path is not provided" (a zero-shot model needs no checkpoint).

For runs of this package's models, :func:`quiet_library_logs` turns the loggers that flood down to WARNING, drops
those lines and keeps one console handler, while this package's messages (and anomalib's, e.g. where files went)
stay at INFO. The warnings of anomalib's own imports come before the model is known: the start-up hook calls
:func:`quiet_command_line` when the ``anomalib`` command names AnomalyCLIP. ``ANOMALYCLIP_VERBOSE=1`` keeps
everything (``ANOMALYCLIP_LOG_LEVEL=INFO`` or ``DEBUG`` also sets the level of every logger).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "LOG_LEVEL_ENV_VAR",
    "NOISY_LOGGERS",
    "VERBOSE_ENV_VAR",
    "names_anomalyclip",
    "quiet_command_line",
    "quiet_library_logs",
    "verbose",
]

LOG_LEVEL_ENV_VAR = "ANOMALYCLIP_LOG_LEVEL"
VERBOSE_ENV_VAR = "ANOMALYCLIP_VERBOSE"
MODEL_NAME = "AnomalyCLIP"
NOISY_LOGGERS = (
    "onnxscript",
    "onnx_ir",
    "torch.onnx",
    "torch.export",
    "torch._dynamo",
    "torch._export",
    "nncf",
    "openvino",
    "httpx",
    "huggingface_hub",
    "urllib3",
    "timm",
    "root_module",
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning_fabric.utilities.rank_zero",
    "pytorch_lightning.utilities.rank_zero",
)
"""Library loggers that print many INFO lines during an export or a download, or Lightning's accelerator lines,
tips and notes (``rank_zero_info``)."""

UNHELPFUL_RECORDS = {"anomalib.engine.engine": ("Overriding ", "ckpt_path is not provided")}
"""Logger -> starts of its messages that say nothing about the user's input."""

QUIET_WARNING_CATEGORIES = (FutureWarning, DeprecationWarning)
"""Warnings of the libraries about their own code (Lightning's deprecations are ``DeprecationWarning`` too)."""

QUIET_WARNING_MESSAGES = (
    r"Found \d+ module\(s\) in eval mode",
    r"The dirpath has changed from",
    r"'pin_memory' argument is set as true but no accelerator is found",
    r"Total length of `\w+` across ranks is zero",
)
"""Lightning's and torch's warnings that are by design here: the frozen CLIP stays in eval mode while the prompts
train; a ``predict --ckpt_path`` writes elsewhere than the run that made the checkpoint; anomalib's ``predict``
data loader asks for pinned memory on a CPU; an exported model's ``predict`` validates on no data."""


def verbose() -> bool:
    """Whether the user asked for every log line and warning (``ANOMALYCLIP_VERBOSE=1`` or a log level)."""
    flag = os.environ.get(VERBOSE_ENV_VAR, "").strip().lower()
    return flag not in {"", "0", "false", "no"} or bool(os.environ.get(LOG_LEVEL_ENV_VAR, "").strip())


def names_anomalyclip(argv: Sequence[str]) -> bool:
    """Whether a command line names this package's models, directly or in a ``--config`` file it passes."""
    for index, argument in enumerate(argv):
        if MODEL_NAME in argument:
            return True
        config = argument.removeprefix("--config=") if argument.startswith("--config=") else None
        if argument in {"--config", "-c"} and index + 1 < len(argv):
            config = argv[index + 1]
        if config and _file_names_model(config):
            return True
    return False


def _file_names_model(path: str) -> bool:
    try:
        return MODEL_NAME in Path(path).read_text(errors="replace")
    except OSError:
        return False


def quiet_command_line(argv: Sequence[str]) -> bool:
    """Silence the libraries' own warnings from the start of an ``anomalib`` command that names AnomalyCLIP.

    Called by the start-up hook when anomalib is first imported (its imports warn before the model is known).

    Returns:
        Whether it did (the command names AnomalyCLIP and the user did not ask for everything).
    """
    if verbose() or not names_anomalyclip(argv):
        return False
    _quiet_warnings()
    return True


def quiet_library_logs() -> bool:
    """Turn the flooding library loggers and warnings down and print each record once; whether it did (not verbose)."""
    level = os.environ.get(LOG_LEVEL_ENV_VAR, "").strip().upper()
    if level:
        logging.getLogger().setLevel(level)
    if verbose():
        return False
    _quiet_warnings()
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name, starts in UNHELPFUL_RECORDS.items():
        _drop_records(logging.getLogger(name), starts)
    for name in ("", "lightning.pytorch"):
        _one_console_handler(logging.getLogger(name))
    return True


def _quiet_warnings() -> None:
    for category in QUIET_WARNING_CATEGORIES:
        warnings.filterwarnings("ignore", category=category)
    for message in QUIET_WARNING_MESSAGES:
        warnings.filterwarnings("ignore", message=message)


class _DropStarts(logging.Filter):
    """Drops the records whose message starts with one of ``starts``."""

    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def _drop_records(logger: logging.Logger, starts: tuple[str, ...]) -> None:
    if not any(isinstance(existing, _DropStarts) for existing in logger.filters):
        logger.addFilter(_DropStarts(starts))


def _one_console_handler(logger: logging.Logger) -> None:
    """Drop rich console handlers where a plain stream handler prints the same records."""
    plain = [handler for handler in logger.handlers if type(handler) is logging.StreamHandler]
    if not plain:
        return
    for handler in list(logger.handlers):
        if type(handler).__name__ == "RichHandler":
            logger.removeHandler(handler)

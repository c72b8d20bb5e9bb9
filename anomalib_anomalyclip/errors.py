"""Every error a user fixes themselves, under one base class, and making them readable in anomalib's command line.

All of them derive from :class:`AnomalyCLIPError` (catch it to catch any of them); those about a wrong value or
file are also ``ValueError``, those about something missing on this machine ``RuntimeError``, so code that
catches the builtin types keeps working. Each message names the file or value, what is wrong and what to do.

anomalib's CLI builds the model inside jsonargparse, which turns any exception of the model's constructor into a
long "Does not validate against any of the Union subtypes" report with the real message in the middle of it.
:func:`explain_setup_errors` logs the message of these errors at ERROR level, on its own line, before the
exception goes on unchanged.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from enum import Enum
from typing import ParamSpec, TypeVar

__all__ = [
    "AnomalyCLIPError",
    "BadImageError",
    "CheckpointFileError",
    "CheckpointNotFoundError",
    "ChoiceError",
    "ExportDataError",
    "ExportUnavailableError",
    "ExportedFileError",
    "ExportedFileNotFoundError",
    "PromptCheckpointError",
    "PromptWeightsError",
    "PromptsUnavailableError",
    "RunNotReadyError",
    "WeightsUnavailableError",
    "explain_setup_errors",
    "parse_choice",
]

logger = logging.getLogger(__name__)

SETUP_ERRORS: dict[str, AnomalyCLIPError | bool | None] = {"log": True, "last": None}
"""``log``: whether :func:`explain_setup_errors` logs (the command line turns it off: it prints errors itself);
``last``: the last error a decorated constructor raised (jsonargparse's reports do not always chain it)."""


class AnomalyCLIPError(Exception):
    """Base of the errors this package raises for users to fix (a file, a value, something missing)."""


class WeightsUnavailableError(AnomalyCLIPError, RuntimeError):
    """The CLIP weights asked for cannot be found locally or downloaded."""


class RunNotReadyError(AnomalyCLIPError, RuntimeError):
    """A command-line run lacks files (prompts, CLIP weights, data); the message lists all of them."""


class PromptWeightsError(AnomalyCLIPError, ValueError):
    """The prompt weights asked for cannot be found, downloaded or verified."""


class PromptCheckpointError(AnomalyCLIPError, ValueError):
    """A prompt checkpoint cannot be used with this model configuration."""


class PromptsUnavailableError(AnomalyCLIPError, RuntimeError):
    """The model would score images with prompts that were never trained or loaded."""

    def __init__(self) -> None:
        super().__init__(
            "AnomalyCLIP has no trained prompts, and scoring with untrained prompts gives meaningless results. "
            "Either pass released prompts (downloaded once and cached): --model.prompt_weights anomalyclip-mvtec "
            "(trained on MVTec AD; use anomalyclip-visa when testing on MVTec AD), or a prompt file: "
            "--model.prompt_weights /path/to/epoch_15.pth, or a trained checkpoint: --ckpt_path model.ckpt. To "
            "learn prompts, run `anomalib fit` with anomalib_anomalyclip.data.AuxiliaryDataModule."
        )


class BadImageError(AnomalyCLIPError, ValueError):
    """An image or mask file cannot be read, or cannot be read correctly; the message names the file and the fix."""


class CheckpointFileError(AnomalyCLIPError, ValueError):
    """A checkpoint path names a file that is not a readable Lightning checkpoint."""


class CheckpointNotFoundError(CheckpointFileError, FileNotFoundError):
    """A checkpoint path names no file (also a ``FileNotFoundError``, as Lightning's own error)."""


class ExportUnavailableError(AnomalyCLIPError, RuntimeError):
    """An export was asked for that cannot run here (missing package or data)."""


class ExportDataError(ExportUnavailableError, ValueError):
    """An export needs other data: also a ``ValueError``, the type anomalib raises when calibration data is missing."""


class ExportedFileError(AnomalyCLIPError, ValueError):
    """``ExportedAnomalyCLIP`` was given no exported file, or a file of an unknown type."""


class ExportedFileNotFoundError(ExportedFileError, FileNotFoundError):
    """``ExportedAnomalyCLIP``'s file does not exist (also a ``FileNotFoundError``)."""


class ChoiceError(AnomalyCLIPError, ValueError):
    """An argument names a choice that does not exist (the message lists the valid ones)."""


E = TypeVar("E", bound=Enum)


def parse_choice(kind: type[E], value: E | str, argument: str) -> E:
    """The member of ``kind`` named ``value`` (its value, e.g. ``"vv"``).

    jsonargparse checks the ``Literal`` types of the CLI itself; this is the same check for Python callers.

    Raises:
        ChoiceError: ``value`` names no member; the message lists the valid values.
    """
    try:
        return kind(value)
    except ValueError:
        valid = ", ".join(repr(member.value) for member in kind)
        raise ChoiceError(f"{argument} must be one of {valid}, got {value!r}.") from None


P = ParamSpec("P")
R = TypeVar("R")


def explain_setup_errors(function: Callable[P, R]) -> Callable[P, R]:
    """Decorate a function (a constructor) so that an :class:`AnomalyCLIPError` it raises is also logged plainly.

    The signature and docstring stay those of ``function`` (jsonargparse reads them for the CLI's arguments).
    """

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return function(*args, **kwargs)
        except AnomalyCLIPError as error:
            SETUP_ERRORS["last"] = error
            if SETUP_ERRORS["log"]:
                logger.error("%s", error)
            raise

    return wrapper

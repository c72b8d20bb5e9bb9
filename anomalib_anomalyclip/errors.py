"""Errors that users fix themselves, and making them readable in anomalib's command line.

anomalib's CLI builds the model inside jsonargparse, which turns any exception of the model's constructor into a
long "Does not validate against any of the Union subtypes" report with the real message in the middle of it.
:func:`explain_setup_errors` logs the message of the errors below at ERROR level, on its own line, before the
exception goes on unchanged.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from .backbone import WeightsUnavailableError
from .data.images import BadImageError
from .prompts import PromptCheckpointError
from .weights import PromptWeightsError

__all__ = ["USER_ERRORS", "explain_setup_errors"]

logger = logging.getLogger(__name__)

USER_ERRORS: tuple[type[Exception], ...] = (
    WeightsUnavailableError,
    PromptWeightsError,
    PromptCheckpointError,
    BadImageError,
)
"""Missing CLIP weights, missing or unknown prompts, prompts of another configuration, unusable image files."""

P = ParamSpec("P")
R = TypeVar("R")


def explain_setup_errors(function: Callable[P, R]) -> Callable[P, R]:
    """Decorate a function (a constructor) so that :data:`USER_ERRORS` it raises are also logged plainly.

    The signature and docstring stay those of ``function`` (jsonargparse reads them for the CLI's arguments).
    """

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return function(*args, **kwargs)
        except USER_ERRORS as error:
            logger.error("%s", error)
            raise

    return wrapper

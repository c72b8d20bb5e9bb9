"""Quiet command-line runs: what the user needs, not hundreds of library INFO lines.

An ``anomalib export`` prints hundreds of INFO lines of the ONNX/OpenVINO tool chain (one per optimisation pass or
node), and anomalib's logging set-up prints every record twice (a plain and a rich handler on the root logger).
:func:`quiet_library_logs` turns the loggers that flood down to WARNING and keeps one console handler, while this
package's messages (and anomalib's, e.g. where files went) stay at INFO. ``ANOMALYCLIP_LOG_LEVEL=INFO`` (or
``DEBUG``) brings everything back.
"""

from __future__ import annotations

import logging
import os

__all__ = ["LOG_LEVEL_ENV_VAR", "NOISY_LOGGERS", "quiet_library_logs"]

LOG_LEVEL_ENV_VAR = "ANOMALYCLIP_LOG_LEVEL"
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
)
"""Library loggers that print many INFO lines during an export or a download."""


def quiet_library_logs() -> bool:
    """Turn the flooding library loggers down and print each record once; returns whether it did (not verbose)."""
    level = os.environ.get(LOG_LEVEL_ENV_VAR, "").strip().upper()
    if level:
        logging.getLogger().setLevel(level)
        return False
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in ("", "lightning.pytorch"):
        _one_console_handler(logging.getLogger(name))
    return True


def _one_console_handler(logger: logging.Logger) -> None:
    """Drop rich console handlers where a plain stream handler prints the same records."""
    plain = [handler for handler in logger.handlers if type(handler) is logging.StreamHandler]
    if not plain:
        return
    for handler in list(logger.handlers):
        if type(handler).__name__ == "RichHandler":
            logger.removeHandler(handler)

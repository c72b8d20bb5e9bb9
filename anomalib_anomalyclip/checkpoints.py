"""Clear errors for a ``--ckpt_path`` (or ``load_from_checkpoint`` file) that is not a readable checkpoint.

Lightning reads a checkpoint with ``torch.load`` and then looks up its keys, so a wrong file ends in a raw
unpickling error (``invalid load key``, ``EOFError``, ``KeyError: 101``) or ``KeyError:
'pytorch-lightning_version'``. Every read of a checkpoint by AnomalyCLIP goes through :func:`read_checkpoint`
instead, which names the file and says what was expected:

* ``anomalib test|predict|fit --ckpt_path``: the trainer reads the file through its ``CheckpointIO``;
  :class:`CheckpointFileCheck` (one of the model's callbacks) wraps that reader before the file is read.
* ``anomalib export --ckpt_path`` and ``AnomalyCLIP.load_from_checkpoint``: :class:`CheckedCheckpointLoading`
  reads the file once before Lightning does (a prompt checkpoint is small).
"""

from __future__ import annotations

import functools
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from anomalib.engine.plugins.checkpoint_io import AnomalibCheckpointIO
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import Callback, LightningModule, Trainer

from .errors import CheckpointFileError, CheckpointNotFoundError

__all__ = [
    "CheckedCheckpointLoading",
    "CheckpointFileCheck",
    "CheckpointFileError",
    "CheckpointNotFoundError",
    "check_checkpoint_io",
    "read_checkpoint",
]

EXPECTED = (
    "Expected a Lightning checkpoint of AnomalyCLIP: the model.ckpt that `anomalib train` or `anomalib fit` writes "
    "(<results>/AnomalyCLIP/<dataset>/<category>/<version>/weights/lightning/model.ckpt). Prompt files "
    "(prompts.pt, the reference's epoch_15.pth) go to --model.prompt_weights, CLIP weights to --model.pretrained."
)
LIGHTNING_KEYS = ("pytorch-lightning_version", "state_dict")
_UNTRUSTED_TYPE = "Unsupported global"  # torch's weights-only reader met a class it does not trust
_MARK = "_anomalyclip_checked"


def read_checkpoint(path: str | Path, load: Callable[[], Any]) -> dict[str, Any]:
    """Read a checkpoint with ``load`` and check that it is a Lightning checkpoint.

    Args:
        path: the checkpoint file (for the messages).
        load: reads the file and returns what it holds.

    Returns:
        The checkpoint, as ``load`` returned it.

    Raises:
        CheckpointNotFoundError: there is no file at ``path``.
        CheckpointFileError: ``path`` is a folder, cannot be unpickled, or holds something else than a Lightning
            checkpoint (prompt weights, CLIP weights, another dictionary).
    """
    file = str(path)
    _check_local_file(file)
    try:
        checkpoint = load()
    except pickle.UnpicklingError as error:
        if _UNTRUSTED_TYPE in str(error):
            raise  # a readable pickle with a class torch does not trust: torch's message says what to do
        raise _unreadable(file, error) from error
    except (EOFError, KeyError, RuntimeError, ValueError, UnicodeDecodeError, AttributeError, ImportError) as error:
        raise _unreadable(file, error) from error
    _check_contents(file, checkpoint)
    return checkpoint


def _check_local_file(file: str) -> None:
    """Raise unless ``file`` exists and is a file (remote paths are left to their reader)."""
    if not isinstance(get_filesystem(file), LocalFileSystem):
        return
    if not Path(file).exists():
        raise CheckpointNotFoundError(f"Checkpoint file not found: '{file}'. {EXPECTED}")
    if not Path(file).is_file():
        raise CheckpointFileError(f"Checkpoint path '{file}' is not a file. {EXPECTED}")


def _unreadable(file: str, error: BaseException) -> CheckpointFileError:
    reason = f"{type(error).__name__}: {error}".strip().rstrip(":")
    return CheckpointFileError(f"Cannot read '{file}' as a checkpoint: torch.load fails with {reason}. {EXPECTED}")


def _check_contents(file: str, checkpoint: object) -> None:
    if not isinstance(checkpoint, Mapping):
        raise CheckpointFileError(
            f"'{file}' holds a {type(checkpoint).__name__}, not a Lightning checkpoint. {EXPECTED}"
        )
    missing = [key for key in LIGHTNING_KEYS if key not in checkpoint]
    if missing:
        keys = sorted(map(str, checkpoint))
        shown = ", ".join(keys[:8]) + (", ..." if len(keys) > 8 else "")
        raise CheckpointFileError(
            f"'{file}' is not a Lightning checkpoint: it lacks {missing} (its keys: {shown or 'none'}). {EXPECTED}"
        )


def check_checkpoint_io(io: CheckpointIO) -> None:
    """Let ``io.load_checkpoint`` go through :func:`read_checkpoint` (once; valid checkpoints load unchanged)."""
    load = io.load_checkpoint
    if getattr(load, _MARK, False):
        return

    @functools.wraps(load)
    def checked_load(path: str | Path, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return read_checkpoint(path, functools.partial(load, path, *args, **kwargs))

    setattr(checked_load, _MARK, True)
    io.load_checkpoint = checked_load


class CheckpointFileCheck(Callback):
    """Check the file of ``ckpt_path`` as the trainer reads it (``setup`` runs before the checkpoint is read)."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Wrap the reader of the trainer's strategy."""
        del pl_module, stage
        check_checkpoint_io(trainer.strategy.checkpoint_io)


class CheckedCheckpointLoading:
    """Mixin for an ``AnomalibModule``: ``load_from_checkpoint`` fails clearly on a file that is no checkpoint."""

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path, *args: Any, **kwargs: Any) -> Any:
        """Check the file as anomalib would read it, then load as anomalib does.

        Args:
            checkpoint_path: the Lightning checkpoint.
            *args: passed on to ``AnomalibModule.load_from_checkpoint``.
            **kwargs: passed on (``weights_only`` also applies to the check).

        Returns:
            The model of the checkpoint.
        """
        if isinstance(checkpoint_path, str | Path):
            io = AnomalibCheckpointIO(extra_safe_globals=cls.checkpoint_safe_globals())
            weights_only = kwargs.get("weights_only", True)
            read_checkpoint(checkpoint_path, lambda: io.load_checkpoint(checkpoint_path, weights_only=weights_only))
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

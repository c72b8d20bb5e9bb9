"""AnomalyCLIP's Lightning checkpoints: what they hold, and clear errors for files that are not one.

A checkpoint holds the prompts, anomalib's components (thresholds, pre-processing) and, under the key
``anomalyclip``, the model's configuration (:meth:`.AnomalyCLIPModel.describe`), whether the prompts were trained
and the few-shot references; not the frozen CLIP (GBs for ViT-L), which is loaded from ``pretrained``
(:func:`save_model_state`, :func:`restore_model_state`).

The files are checked as they are read:

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
import logging
import re
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anomalib.engine.plugins.checkpoint_io import AnomalibCheckpointIO
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import Callback, LightningModule, Trainer

from anomalib_anomalyclip.config import is_flat, upgrade
from anomalib_anomalyclip.errors import CheckpointFileError, CheckpointNotFoundError, PromptCheckpointError
from anomalib_anomalyclip.method.few_shot import few_shot_settings
from anomalib_anomalyclip.method.prompts import prompts_of_lightning_checkpoint

if TYPE_CHECKING:
    from anomalib_anomalyclip.method.torch_model import AnomalyCLIPModel

__all__ = [
    "FROZEN_PREFIXES",
    "MODEL_INFO_KEY",
    "CheckedCheckpointLoading",
    "CheckpointFileCheck",
    "CheckpointFileError",
    "CheckpointNotFoundError",
    "check_checkpoint_io",
    "read_checkpoint",
    "read_checkpoint_file",
    "restore_model_state",
    "save_model_state",
    "stored_clip",
]

EXPECTED = (
    "Expected a Lightning checkpoint of AnomalyCLIP: the model.ckpt that `anomalib train` or `anomalib fit` writes "
    "(<results>/AnomalyCLIP/<dataset>/<category>/<version>/weights/lightning/model.ckpt). Prompt files "
    "(prompts.pt, the reference's epoch_15.pth) go to --model.prompt_weights, CLIP weights to --model.pretrained."
)
LIGHTNING_KEYS = ("pytorch-lightning_version", "state_dict")
_UNTRUSTED_TYPE = "Unsupported global"  # torch's weights-only reader met a class it does not trust
_MARK = "_anomalyclip_checked"
_SNIFF_BYTES = 512
MODEL_INFO_KEY = "anomalyclip"
FROZEN_PREFIXES = ("model.visual_encoder.", "model.text_encoder.")  # the frozen CLIP: never stored in checkpoints

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestoredState:
    """What a checkpoint says beside the tensors.

    Attributes:
        prompts_trained: the prompts were trained or loaded when the checkpoint was written.
        references: the few-shot reference images whose tokens fill the restored bank (empty: none).
    """

    prompts_trained: bool
    references: list[str]


def save_model_state(
    checkpoint: dict[str, Any],
    model: AnomalyCLIPModel,
    prompts_trained: bool,
    references: Sequence[str],
    clip: Mapping[str, Any] | None = None,
) -> None:
    """Drop the frozen CLIP from ``checkpoint``; record the configuration, prompt state, references and CLIP.

    Args:
        checkpoint: the checkpoint Lightning is about to write.
        model: the torch model.
        prompts_trained: whether the prompts were trained or loaded.
        references: the few-shot reference images.
        clip: which CLIP the model runs on (:func:`.backbone.clip_source`), so that later runs find it again.
    """
    checkpoint["state_dict"] = {
        key: value for key, value in checkpoint["state_dict"].items() if not key.startswith(FROZEN_PREFIXES)
    }
    info = {"prompts_trained": bool(prompts_trained), **model.describe()}
    if "few_shot" in info:
        info["few_shot"]["references"] = list(references)
    if clip is not None:
        info["clip"] = dict(clip)
    checkpoint[MODEL_INFO_KEY] = info


def stored_clip(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The CLIP a checkpoint was made with: ``backbone``, ``pretrained``, ``sha256`` and ``image_size`` where known.

    Checkpoints written before the CLIP was recorded give what their hyper-parameters say (no ``sha256``).
    """
    info = checkpoint.get(MODEL_INFO_KEY, {})
    hyper_parameters = checkpoint.get("hyper_parameters", {})
    stored = {key: hyper_parameters[key] for key in ("backbone", "pretrained", "image_size") if key in hyper_parameters}
    stored.update(info.get("clip", {}))
    if "image_size" in info:
        stored["image_size"] = info["image_size"]
    return stored


def restore_model_state(
    checkpoint: dict[str, Any], model: AnomalyCLIPModel, own_state: Mapping[str, Any]
) -> RestoredState:
    """Prepare ``model`` for the checkpoint's tensors, before Lightning loads them.

    Fills in the frozen CLIP from ``own_state`` (the module's state dict, so that Lightning does not list hundreds of
    missing keys), loads the prompts, warns where the checkpoint's prompts were made for another configuration, and
    gives a zero-shot model the checkpoint's few-shot bank.

    Raises:
        PromptCheckpointError: the checkpoint holds no prompts, or a bank the few-shot model cannot read.
    """
    frozen = {key: value for key, value in own_state.items() if key.startswith(FROZEN_PREFIXES)}
    checkpoint["state_dict"] = {**frozen, **checkpoint.get("state_dict", {})}
    state = prompts_of_lightning_checkpoint(checkpoint)
    if not state:
        raise PromptCheckpointError("The checkpoint holds no AnomalyCLIP prompts (no 'model.prompt_learner.*').")
    model.load_prompt_state(state, source="the Lightning checkpoint")
    info = checkpoint.get(MODEL_INFO_KEY, {})
    current = model.describe()
    for key in ("feature_layers", "dpam_kind"):
        if key in info and info[key] != current[key]:
            logger.warning(
                "Checkpoint prompts were trained with %s=%s; this model uses %s.", key, info[key], current[key]
            )
    stored = info.get("few_shot")
    if stored:
        _adopt_few_shot(model, stored)
    return RestoredState(bool(info.get("prompts_trained", True)), list((stored or {}).get("references", [])))


def _adopt_few_shot(model: AnomalyCLIPModel, stored: Mapping[str, Any]) -> None:
    settings = few_shot_settings(
        int(stored["k_shot"]), stored["layers"], stored["tokens"], stored["fusion"], model.feature_layers
    )
    current = model.few_shot_settings
    if current is None or not current.k_shot:
        model.use_few_shot(settings)
    elif settings.taps != current.taps:
        raise PromptCheckpointError(
            f"The checkpoint's few-shot bank reads layers {list(settings.layers)} ({settings.tokens.value} "
            f"tokens); this model reads {list(current.layers)} ({current.tokens.value}). Drop the "
            "few_shot.layers/few_shot.tokens arguments to use the checkpoint's."
        )


def read_checkpoint(path: str | Path, load: Callable[[], Any]) -> dict[str, Any]:
    """Read a checkpoint with ``load`` and check that it is a Lightning checkpoint.

    A local file is first checked to be what ``torch.save`` writes (a zip archive holding ``data.pkl``), so that
    text, HTML pages, random bytes, other archives and bare pickle streams are refused without unpickling
    anything; ``load`` is expected to read weights-only (no arbitrary classes), and a class it refuses is reported
    as a file that is not this model's checkpoint. No error is chained to the reader's, so that a user sees one
    message, not the unpickler's traceback.

    Args:
        path: the checkpoint file (for the messages).
        load: reads the file and returns what it holds.

    Returns:
        The checkpoint, as ``load`` returned it.

    Raises:
        CheckpointNotFoundError: there is no file at ``path``.
        CheckpointFileError: ``path`` is a folder, is no ``torch.save`` archive, cannot be unpickled weights-only,
            or holds something else than a Lightning checkpoint (prompt weights, CLIP weights, another dictionary).
    """
    file = str(path)
    if _check_local_file(file):
        _check_archive(file)
    try:
        checkpoint = load()
    except Exception as error:  # any failure of the reader means: not a checkpoint that can be read
        raise _unreadable(file, error) from None
    _check_contents(file, checkpoint)
    return checkpoint


def read_checkpoint_file(
    path: str | Path, safe_globals: Sequence[Any] = (), weights_only: bool = True
) -> dict[str, Any]:
    """Read and check a checkpoint file as anomalib reads it (weights-only, with ``safe_globals`` trusted)."""
    io = AnomalibCheckpointIO(extra_safe_globals=list(safe_globals))
    return read_checkpoint(path, lambda: io.load_checkpoint(path, weights_only=weights_only))


def _check_local_file(file: str) -> bool:
    """Raise unless ``file`` exists and is a file; ``False`` for remote paths (left to their reader)."""
    if not isinstance(get_filesystem(file), LocalFileSystem):
        return False
    if not Path(file).exists():
        raise CheckpointNotFoundError(f"Checkpoint file not found: '{file}'. {EXPECTED}")
    if not Path(file).is_file():
        raise CheckpointFileError(f"Checkpoint path '{file}' is not a file. {EXPECTED}")
    return True


def _check_archive(file: str) -> None:
    """Raise unless ``file`` is a zip archive with a ``data.pkl`` entry, as ``torch.save`` writes (not unpickled)."""
    if zipfile.is_zipfile(file):
        try:
            with zipfile.ZipFile(file) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as error:
            message = f"Cannot read '{file}' as a checkpoint: a damaged zip archive ({error}). {EXPECTED}"
            raise CheckpointFileError(message) from None
        if any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
            return
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        what = f"a zip archive of something else (entries: {shown or 'none'})"
    else:
        what = describe_file_start(file)
    raise CheckpointFileError(f"Cannot read '{file}' as a checkpoint: it is {what}. {EXPECTED}")


def describe_file_start(file: str | Path) -> str:
    """What the first bytes of a file that is not a zip archive look like, in words (for error messages)."""
    with open(file, "rb") as stream:
        head = stream.read(_SNIFF_BYTES)
    if not head:
        return "an empty file"
    if head.startswith(b"\x80"):  # the PROTO opcode of pickle protocols 2 and later
        return "a bare pickle stream, not the zip archive torch.save writes (it is not unpickled: that can run code)"
    if not _is_text(head):
        return "binary data, not the zip archive torch.save writes (perhaps truncated or another format)"
    text = head.decode("utf-8", errors="replace")
    if "<html" in text.lower() or text.lstrip().lower().startswith("<!doctype"):
        return "an HTML page (a download that saved a web page, e.g. an error or login page, instead of the file)"
    first = " ".join(text.split())[:60]
    return f"a text file (it begins: {first!r})"


def _is_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as error:
        return error.start >= len(head) - 3  # a character cut by the sniffing window
    return b"\x00" not in head


def _unreadable(file: str, error: BaseException) -> CheckpointFileError:
    if _UNTRUSTED_TYPE in str(error):
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        name = found.group(1) if found else "a class"
        return CheckpointFileError(
            f"Cannot read '{file}' as a checkpoint: it asks to load {name}, which an AnomalyCLIP checkpoint never "
            f"holds, so it was not loaded (the file is not trusted). {EXPECTED}"
        )
    reason = f"{type(error).__name__}: {error}".strip().rstrip(":").splitlines()[0][:200]
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

        A checkpoint of flat arguments (written before the groups) is built from its upgraded arguments
        (:func:`.config.upgrade`).

        Args:
            checkpoint_path: the Lightning checkpoint.
            *args: passed on to ``AnomalibModule.load_from_checkpoint``.
            **kwargs: passed on (``weights_only`` also applies to the check).

        Returns:
            The model of the checkpoint.
        """
        if isinstance(checkpoint_path, str | Path):
            checkpoint = read_checkpoint_file(
                checkpoint_path, cls.checkpoint_safe_globals(), kwargs.get("weights_only", True)
            )
            hyper_parameters = checkpoint.get("hyper_parameters", {})
            if is_flat(hyper_parameters):  # written before the arguments became groups
                kwargs = upgrade({**hyper_parameters, **kwargs})
                with warnings.catch_warnings():  # Lightning passes the flat ones too: upgraded the same way
                    warnings.simplefilter("ignore", FutureWarning)
                    return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

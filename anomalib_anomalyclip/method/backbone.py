"""Loading the frozen CLIP backbone through open_clip.

AnomalyCLIP uses OpenAI's CLIP ViT-L/14@336 with QuickGELU. Weights can come from
three places:

* an open_clip pretrained tag (``pretrained="openai"``), downloaded once into the
  open_clip / Hugging Face cache;
* an OpenAI-format file (``ViT-L-14-336px.pt`` as OpenAI publishes it: a TorchScript
  archive, or a plain state dict with the same keys). The architecture is read from
  the tensors, so any width and depth works, and QuickGELU is used;
* an open_clip checkpoint file (``{"state_dict": ...}`` as open_clip's trainer writes
  it, or a state dict in open_clip's own layout). The architecture comes from
  ``backbone``.

Whatever the source, the returned model is in float32, in eval mode and frozen.

Example:
    >>> from anomalib_anomalyclip.method.backbone import load_clip
    >>> clip = load_clip("ViT-L-14-336", "/models/ViT-L-14-336px.pt")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import open_clip
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from anomalib_anomalyclip.errors import WeightsUnavailableError

logger = logging.getLogger(__name__)

OPENAI_KEYS = ("visual.proj", "visual.conv1.weight", "token_embedding.weight", "ln_final.weight")
OPENAI_DOWNLOADS = {
    "ViT-L-14-336": "ViT-L-14-336px.pt",
    "ViT-L-14": "ViT-L-14.pt",
    "ViT-B-16": "ViT-B-16.pt",
    "ViT-B-32": "ViT-B-32.pt",
}


def load_clip(backbone: str, pretrained: str | Path | None, cache_dir: str | None = None) -> CLIP:
    """Build a frozen, float32 open_clip CLIP model.

    Args:
        backbone: open_clip model name, e.g. ``"ViT-L-14-336"``.
        pretrained: an open_clip pretrained tag (e.g. ``"openai"``), a path to a local
            checkpoint file, or ``None`` for random weights (tests only).
        cache_dir: where open_clip keeps downloaded weights. ``None`` uses its default.

    Returns:
        The CLIP model, frozen, in eval mode.

    Raises:
        WeightsUnavailableError: the file does not exist, or the tag's weights are not
            cached and cannot be downloaded.
        ValueError: ``backbone`` or the tag is not known to open_clip.
    """
    if pretrained is None or pretrained == "":
        model = _create_random(backbone)
    elif _looks_like_path(pretrained):
        model = load_clip_file(Path(pretrained), backbone)
    else:
        model = _load_tag(backbone, str(pretrained), cache_dir)
    return freeze(model.float().eval())


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Turn off gradients for every parameter of ``model`` and return it."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def load_clip_file(path: Path, backbone: str) -> CLIP:
    """Load CLIP from a local checkpoint file (OpenAI or open_clip format).

    Args:
        path: the checkpoint file.
        backbone: open_clip model name, used only for open_clip-format files whose
            architecture cannot be read from the tensors alone.

    Returns:
        The CLIP model (not yet frozen).

    Raises:
        WeightsUnavailableError: the file does not exist.
        ValueError: the file holds no CLIP weights.
    """
    if not path.is_file():
        raise WeightsUnavailableError(
            f"CLIP weights file '{path}' does not exist. Pass the path of an existing file with "
            f"--model.pretrained (e.g. OpenAI's {_openai_file_name(backbone)}), or an open_clip tag such as 'openai'."
        )
    checkpoint, is_torchscript = _read_checkpoint(path)
    if is_torchscript:
        return build_clip_from_openai_state_dict(checkpoint)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"'{path}' holds a {type(checkpoint).__name__}, not CLIP weights (expected a state dict).")
    if "state_dict" in checkpoint:
        logger.info("Loading open_clip training checkpoint %s with architecture %s", path, backbone)
        return _create_from_open_clip_file(backbone, path)
    state_dict = _strip_module_prefix(checkpoint)
    if all(key in state_dict for key in OPENAI_KEYS):
        logger.info("Loading OpenAI-format CLIP state dict %s (architecture read from the tensors)", path)
        return build_clip_from_openai_state_dict(state_dict)
    return _create_from_open_clip_file(backbone, path)


def build_clip_from_openai_state_dict(state_dict: Mapping[str, torch.Tensor]) -> CLIP:
    """Build a float32 QuickGELU CLIP whose architecture is read from OpenAI-layout tensors.

    Unlike ``open_clip.model.build_model_from_openai_state_dict``, the model is not
    converted to float16 first, so float32 weights load without rounding.

    Args:
        state_dict: tensors with OpenAI CLIP's key names (vision transformers only).

    Returns:
        The CLIP model with the weights loaded.

    Raises:
        ValueError: the tensors are not those of a vision-transformer CLIP.
    """
    missing = [key for key in OPENAI_KEYS if key not in state_dict]
    if missing:
        raise ValueError(f"Not an OpenAI-format vision-transformer CLIP state dict: missing {missing}.")
    vision_width = state_dict["visual.conv1.weight"].shape[0]
    vision_patch = state_dict["visual.conv1.weight"].shape[-1]
    grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = state_dict["ln_final.weight"].shape[0]
    vision_cfg = CLIPVisionCfg(
        layers=_count_blocks(state_dict, "visual.transformer.resblocks."),
        width=vision_width,
        head_width=64,
        patch_size=vision_patch,
        image_size=vision_patch * grid,
    )
    text_cfg = CLIPTextCfg(
        context_length=state_dict["positional_embedding"].shape[0],
        vocab_size=state_dict["token_embedding.weight"].shape[0],
        width=text_width,
        heads=max(text_width // 64, 1),
        layers=_count_blocks(state_dict, "transformer.resblocks."),
    )
    model = CLIP(state_dict["text_projection"].shape[1], vision_cfg=vision_cfg, text_cfg=text_cfg, quick_gelu=True)
    tensors = {
        key: value
        for key, value in state_dict.items()
        if key not in {"input_resolution", "context_length", "vocab_size"}
    }
    model.load_state_dict({key: value.float() for key, value in tensors.items()})
    return model


def _count_blocks(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    return len({key[len(prefix) :].split(".")[0] for key in state_dict if key.startswith(prefix)})


def _looks_like_path(pretrained: str | Path) -> bool:
    text = str(pretrained)
    return (
        isinstance(pretrained, Path)
        or "/" in text
        or "\\" in text
        or Path(text).suffix in {".pt", ".pth", ".bin", ".safetensors"}
    )


def is_torchscript_archive(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (OpenAI's release format) rather than a pickle."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())


def _read_checkpoint(path: Path) -> tuple[object, bool]:
    """Return the file's content and whether it was a TorchScript archive."""
    if is_torchscript_archive(path):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated", category=FutureWarning)
            return torch.jit.load(str(path), map_location="cpu").state_dict(), True
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path)), False
    try:
        return torch.load(path, map_location="cpu", weights_only=True), False
    except Exception as error:
        raise ValueError(
            f"Cannot read CLIP weights from '{path}': {error}. Expected OpenAI's TorchScript archive "
            "(e.g. ViT-L-14-336px.pt), a state dict saved with torch.save, or an open_clip checkpoint."
        ) from error


def _strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if state_dict and all(key.startswith("module.") for key in state_dict):
        return {key[len("module.") :]: value for key, value in state_dict.items()}
    return dict(state_dict)


def _create_random(backbone: str) -> CLIP:
    _check_backbone_name(backbone)
    return open_clip.create_model(backbone, pretrained=None, force_quick_gelu=True)


def _create_from_open_clip_file(backbone: str, path: Path) -> CLIP:
    _check_backbone_name(backbone)
    return open_clip.create_model(backbone, pretrained=str(path))


def _check_backbone_name(backbone: str) -> None:
    if backbone not in open_clip.list_models():
        known = ", ".join(open_clip.list_models()[:20])
        raise ValueError(f"Unknown open_clip model '{backbone}'. Known models include: {known}, ...")


def _load_tag(backbone: str, tag: str, cache_dir: str | None) -> CLIP:
    _check_backbone_name(backbone)
    config = open_clip.get_pretrained_cfg(backbone, tag)
    if not config:
        tags = open_clip.list_pretrained_tags_by_model(backbone)
        raise ValueError(
            f"open_clip has no pretrained tag '{tag}' for {backbone}; known tags: {tags}. A local file path also works."
        )
    try:
        checkpoint = open_clip.download_pretrained(config, cache_dir=cache_dir)
    except Exception as error:
        raise WeightsUnavailableError(_offline_message(backbone, tag, config.get("url", ""), error)) from error
    if not checkpoint:
        raise WeightsUnavailableError(_offline_message(backbone, tag, config.get("url", ""), "no download location"))
    if is_torchscript_archive(Path(checkpoint)):
        return load_clip_file(Path(checkpoint), backbone)
    return open_clip.create_model(backbone, pretrained=checkpoint, force_quick_gelu=bool(config.get("quick_gelu")))


def _openai_file_name(backbone: str) -> str:
    return OPENAI_DOWNLOADS.get(backbone, f"the {backbone} checkpoint")


def _offline_message(backbone: str, tag: str, url: str, error: object) -> str:
    source = f" from {url}" if url else ""
    name = Path(urlparse(url).path).name if url else "the file"
    return (
        f"Could not get the CLIP weights for {backbone} (tag '{tag}'): they are not in the local cache and "
        f"downloading failed ({error}). To run offline, download {_openai_file_name(backbone)}{source} "
        f"on a machine with internet, copy it to this machine (e.g. to {Path.cwd() / name}) and pass its path: "
        f"--model.pretrained {Path.cwd() / name} (Python: pretrained='{Path.cwd() / name}'). Alternatively fill the "
        "open_clip/Hugging Face cache (HF_HOME) on a connected machine and copy it over."
    )


def clip_source(backbone: str, pretrained: str | Path | None) -> dict[str, Any]:
    """What a checkpoint records of its CLIP: the backbone, the tag or the absolute file path, the file's SHA-256."""
    if not is_weights_file(pretrained):
        return {"backbone": backbone, "pretrained": pretrained or None, "sha256": None}
    path = Path(pretrained).expanduser().resolve()
    return {"backbone": backbone, "pretrained": str(path), "sha256": file_sha256(path) if path.is_file() else None}


def is_weights_file(pretrained: str | Path | None) -> bool:
    """Whether ``pretrained`` names a file (rather than an open_clip tag or random weights)."""
    return bool(pretrained) and _looks_like_path(pretrained)


def file_sha256(path: Path) -> str:
    """SHA-256 of a weights file (kept per path, size and modification time: a ViT-L file takes a second)."""
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


@functools.cache
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    del size, mtime_ns  # part of the cache key only
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def clip_weights_problem(backbone: str, pretrained: str | None, cache_dir: str | None, online: bool) -> str | None:
    """What is missing for the CLIP weights on this machine, without downloading (``None``: nothing).

    A file must exist; a tag's weights must be in open_clip's cache unless ``online``. With no network, the hub
    libraries are in their offline mode (:mod:`.network`), so looking in the cache returns at once.
    """
    if not pretrained:
        return None
    if _looks_like_path(pretrained):
        if Path(pretrained).expanduser().is_file():
            return None
        return (
            f"the CLIP weights: no file '{pretrained}'. Pass the path of {_openai_file_name(backbone)} (or another "
            "CLIP file) with --model.pretrained"
        )
    config = open_clip.get_pretrained_cfg(backbone, pretrained) if backbone in open_clip.list_models() else None
    if online or not config:
        return None  # downloaded at the start of the run; unknown names are reported by the model
    with contextlib.suppress(Exception):  # not cached: reported below
        if open_clip.download_pretrained(config):
            return None
    url = config.get("url", "")
    return (
        f"the CLIP weights of {backbone} (tag '{pretrained}'): not in the open_clip/Hugging Face cache (HF_HOME) and "
        f"there is no network. Download {_openai_file_name(backbone)}{f' from {url}' if url else ''} elsewhere, copy "
        "it here and pass it: --model.pretrained /path/to/file"
    )

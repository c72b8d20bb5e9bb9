"""Small randomly initialised CLIP checkpoints for tests, notebooks and benchmarks.

The real AnomalyCLIP backbone is OpenAI's CLIP ViT-L/14@336 (about 430M parameters). The helpers
in this module write a *tiny* CLIP with the same structure and the same checkpoint layouts that
users have on disk, so loading code can be exercised end to end without downloading anything:

* :func:`save_openai_state_dict`: a plain ``torch.save(state_dict)`` file with OpenAI's key names
  (``visual.conv1.weight``, ``visual.transformer.resblocks.N.attn.in_proj_weight``, ``visual.proj``,
  ``token_embedding.weight``, ``text_projection``, ``ln_final.weight``, ``logit_scale``, ...).
* :func:`save_openai_jit_archive`: a TorchScript archive like OpenAI's released
  ``ViT-L-14-336px.pt``; its ``state_dict()`` has the same keys plus the integer entries
  ``input_resolution``, ``context_length`` and ``vocab_size``.
* :func:`save_open_clip_checkpoint`: the dictionary written by open_clip's training script,
  ``{"epoch": ..., "name": ..., "state_dict": {"module.<key>": tensor}}``.

The default :class:`TinyClipConfig` keeps the parts of ViT-L/14@336 that shape-dependent code cares
about (24 vision layers, patch size 14, a 24x24 patch grid, 77 text tokens and the full 49408-token
BPE vocabulary) while shrinking the widths to 64, so a checkpoint is about 20 MB.

Example:
    >>> from anomalib_anomalyclip.testing.tiny_clip import save_openai_state_dict
    >>> path = save_openai_state_dict("/tmp/tiny_clip.pt")  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import hashlib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, convert_weights_to_fp16

__all__ = [
    "TinyClipConfig",
    "build_tiny_clip",
    "save_open_clip_checkpoint",
    "save_openai_jit_archive",
    "save_openai_state_dict",
    "tiny_clip_digest",
]

# OpenAI CLIP uses one attention head per 64 channels.
_HEAD_WIDTH = 64
# Standard deviation of the noise added to every floating parameter after open_clip's init.
_PERTURBATION_STD = 0.02
# Offset so that the perturbation stream differs from the stream used by the initialisation.
_PERTURBATION_SEED_OFFSET = 1_000_003


@dataclass(frozen=True)
class TinyClipConfig:
    """Architecture of a tiny OpenAI-style CLIP (ViT image tower, transformer text tower).

    Widths must be multiples of 64 because, as in OpenAI CLIP, the number of attention heads is
    ``width // 64``.

    Attributes:
        embed_dim: Dimension of the joint image-text embedding space.
        vision_width: Channels of the vision transformer.
        vision_layers: Number of vision transformer blocks.
        vision_patch_size: Side of the square patches of the image tokenizer.
        image_resolution: Side of the square input image; the patch grid is
            ``image_resolution // vision_patch_size`` on each side.
        text_width: Channels of the text transformer.
        text_layers: Number of text transformer blocks.
        context_length: Number of text tokens.
        vocab_size: Size of the token embedding table (49408 is CLIP's BPE vocabulary).
    """

    embed_dim: int = 32
    vision_width: int = 64
    vision_layers: int = 24
    vision_patch_size: int = 14
    image_resolution: int = 336
    text_width: int = 64
    text_layers: int = 12
    context_length: int = 77
    vocab_size: int = 49408

    def __post_init__(self) -> None:
        """Validate the configuration.

        Raises:
            ValueError: If a field is not positive, a width is not a multiple of 64, or the image
                resolution is not a multiple of the patch size.
        """
        for name, value in vars(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                msg = f"TinyClipConfig.{name} must be a positive integer, got {value!r}"
                raise ValueError(msg)
        for name in ("vision_width", "text_width"):
            if getattr(self, name) % _HEAD_WIDTH:
                msg = f"TinyClipConfig.{name} must be a multiple of {_HEAD_WIDTH}, got {getattr(self, name)}"
                raise ValueError(msg)
        if self.image_resolution % self.vision_patch_size:
            msg = (
                f"image_resolution ({self.image_resolution}) must be a multiple of "
                f"vision_patch_size ({self.vision_patch_size})"
            )
            raise ValueError(msg)

    @property
    def vision_heads(self) -> int:
        """Number of attention heads of the vision transformer."""
        return self.vision_width // _HEAD_WIDTH

    @property
    def text_heads(self) -> int:
        """Number of attention heads of the text transformer."""
        return self.text_width // _HEAD_WIDTH

    @property
    def grid_size(self) -> int:
        """Number of patches along each side of the image."""
        return self.image_resolution // self.vision_patch_size


def build_tiny_clip(config: TinyClipConfig | None = None, seed: int = 0) -> CLIP:
    """Build a randomly initialised float32 ``open_clip.model.CLIP`` in eval mode.

    open_clip's initialisation leaves several tensors at constant values (attention biases at zero,
    LayerNorm weights at one, ...). Every floating parameter therefore receives a small seeded
    Gaussian perturbation so that a test which mixes up or drops a tensor sees a difference.

    The global random state of the caller is left untouched.

    Args:
        config: Architecture; defaults to :class:`TinyClipConfig`.
        seed: Seed of the initialisation. The same seed gives bitwise identical weights.

    Returns:
        The CLIP model, with ``quick_gelu=True`` as OpenAI's models.
    """
    config = config or TinyClipConfig()
    vision_cfg = CLIPVisionCfg(
        layers=config.vision_layers,
        width=config.vision_width,
        head_width=_HEAD_WIDTH,
        patch_size=config.vision_patch_size,
        image_size=config.image_resolution,
    )
    text_cfg = CLIPTextCfg(
        context_length=config.context_length,
        vocab_size=config.vocab_size,
        width=config.text_width,
        heads=config.text_heads,
        layers=config.text_layers,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(config.embed_dim, vision_cfg=vision_cfg, text_cfg=text_cfg, quick_gelu=True)
    model = model.float()

    generator = torch.Generator().manual_seed(seed + _PERTURBATION_SEED_OFFSET)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters()):
            if parameter.is_floating_point():
                noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
                parameter.add_(noise * _PERTURBATION_STD)
    return model.eval()


def tiny_clip_digest(config: TinyClipConfig | None = None, seed: int = 0) -> str:
    """SHA-256 of the weights of ``build_tiny_clip(config, seed)`` (names and bytes, in name order).

    Tests that keep files made with a tiny CLIP check with it that the writer still gives the same CLIP.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(build_tiny_clip(config, seed).state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _prepare_path(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _openai_model(config: TinyClipConfig | None, seed: int, half_precision: bool) -> CLIP:
    model = build_tiny_clip(config, seed=seed)
    if half_precision:
        # The same tensors that OpenAI's release keeps in float16 (convolutions, linear and
        # attention layers, ``text_projection`` and ``visual.proj``).
        convert_weights_to_fp16(model)
    return model


def save_openai_state_dict(
    path: str | os.PathLike[str],
    config: TinyClipConfig | None = None,
    seed: int = 0,
    *,
    half_precision: bool = False,
) -> Path:
    """Write ``torch.save(model.state_dict())`` of a tiny CLIP with OpenAI's key names.

    The file is accepted by ``open_clip.model.build_model_from_openai_state_dict`` and
    ``open_clip.load_openai_model``.

    Args:
        path: Destination file; parent directories are created.
        config: Architecture; defaults to :class:`TinyClipConfig`.
        seed: Seed of :func:`build_tiny_clip`.
        half_precision: Store the weights that OpenAI keeps in float16 as float16 instead of float32.

    Returns:
        The path of the written file.
    """
    path = _prepare_path(path)
    model = _openai_model(config, seed, half_precision)
    torch.save(model.state_dict(), path)
    return path


def _non_persistent_buffers_to_attributes(model: torch.nn.Module) -> None:
    """Turn non-persistent buffers into plain tensor attributes (in place).

    TorchScript puts every buffer into ``state_dict()``, persistent or not. OpenAI's archive keeps
    the causal attention mask out of its state dict, so the mask must become a traced constant.
    """
    for module in model.modules():
        for name in list(module._non_persistent_buffers_set):
            tensor = module._buffers.pop(name)
            module._non_persistent_buffers_set.discard(name)
            setattr(module, name, tensor)


def save_openai_jit_archive(
    path: str | os.PathLike[str],
    config: TinyClipConfig | None = None,
    seed: int = 0,
    *,
    half_precision: bool = False,
) -> Path:
    """Write a TorchScript archive of a tiny CLIP, laid out like OpenAI's released ``.pt`` files.

    The archive's ``state_dict()`` holds exactly the keys of :func:`save_openai_state_dict` plus the
    0-dim int64 tensors ``input_resolution``, ``context_length`` and ``vocab_size``. The traced
    methods are ``forward(image, text)``, ``encode_image(image)`` and ``encode_text(text)``, for a
    batch of one image of ``config.image_resolution`` pixels and one sequence of
    ``config.context_length`` tokens (other batch sizes work for the traced graph as well).

    Args:
        path: Destination file; parent directories are created.
        config: Architecture; defaults to :class:`TinyClipConfig`.
        seed: Seed of :func:`build_tiny_clip`.
        half_precision: Store the weights that OpenAI keeps in float16 as float16 instead of float32;
            the traced methods then take float16 images.

    Returns:
        The path of the written file.
    """
    config = config or TinyClipConfig()
    path = _prepare_path(path)
    model = _openai_model(config, seed, half_precision)
    _non_persistent_buffers_to_attributes(model)
    metadata = {
        "input_resolution": config.image_resolution,
        "context_length": config.context_length,
        "vocab_size": config.vocab_size,
    }
    for name, value in metadata.items():
        # open_clip stores these as plain int attributes; OpenAI's archive has them as tensors.
        if name in vars(model):
            delattr(model, name)
        model.register_buffer(name, torch.tensor(value, dtype=torch.int64))

    image_dtype = torch.float16 if half_precision else torch.float32
    image = torch.zeros(1, 3, config.image_resolution, config.image_resolution, dtype=image_dtype)
    # Start and end tokens so that the end-of-text pooling (argmax of the token ids) is meaningful.
    text = torch.zeros(1, config.context_length, dtype=torch.int64)
    text[0, 0] = config.vocab_size - 2
    text[0, 1] = config.vocab_size - 1
    inputs = {"forward": (image, text), "encode_image": (image,), "encode_text": (text,)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated", category=FutureWarning)
        with torch.no_grad():
            traced = torch.jit.trace_module(model, inputs, check_trace=False)
        torch.jit.save(traced, str(path))
    return path


def save_open_clip_checkpoint(
    path: str | os.PathLike[str],
    config: TinyClipConfig | None = None,
    seed: int = 0,
    *,
    epoch: int = 1,
    name: str = "tiny",
) -> Path:
    """Write a tiny CLIP in the checkpoint format of open_clip's training script.

    The file holds ``{"epoch": epoch, "name": name, "state_dict": {"module." + key: tensor}}``, the
    ``module.`` prefix coming from ``DistributedDataParallel``.

    Args:
        path: Destination file; parent directories are created.
        config: Architecture; defaults to :class:`TinyClipConfig`.
        seed: Seed of :func:`build_tiny_clip`.
        epoch: Value of the ``"epoch"`` entry.
        name: Value of the ``"name"`` entry (the training run name).

    Returns:
        The path of the written file.
    """
    path = _prepare_path(path)
    model = build_tiny_clip(config, seed=seed)
    state_dict = {f"module.{key}": value for key, value in model.state_dict().items()}
    torch.save({"epoch": epoch, "name": name, "state_dict": state_dict}, path)
    return path


_WRITERS = {
    "openai": save_openai_state_dict,
    "openai-jit": save_openai_jit_archive,
    "open_clip": save_open_clip_checkpoint,
}


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point: ``python -m anomalib_anomalyclip.testing.tiny_clip PATH [--format ...]``.

    Args:
        argv: Arguments without the program name; defaults to ``sys.argv[1:]``.
    """
    parser = argparse.ArgumentParser(description="Write a tiny randomly initialised CLIP checkpoint.")
    parser.add_argument("path", type=Path, help="destination file")
    parser.add_argument("--format", choices=sorted(_WRITERS), default="openai", help="checkpoint layout")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed")
    args = parser.parse_args(argv)
    written = _WRITERS[args.format](args.path, seed=args.seed)
    print(written)


if __name__ == "__main__":
    main()

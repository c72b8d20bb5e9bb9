"""Learnable text prompts of AnomalyCLIP and the text encoder that reads them.

Two sentences are encoded with CLIP's text transformer:

* normal: ``[V1] ... [Vn] object.``
* abnormal: ``[W1] ... [Wn] damaged object.``

The ``V`` and ``W`` word embeddings are learnable context vectors. In addition, before
text blocks 2..``text_token_depth`` (1-indexed), hidden positions 1..``text_token_length``
of both sentences are overwritten by that block's own learnable tokens. The
object-aware variant (an ablation of the paper) puts the class name where ``object`` is.

Prompt checkpoints:

* ours: ``{"anomalyclip_prompts": 1, "config": {...}, "state_dict": {...}}``, written by
  :func:`save_prompts`;
* the reference's released ``epoch_15.pth``: ``{"prompt_learner": {"ctx_pos",
  "ctx_neg", "compound_prompts_text.N", ...}}`` (unused keys ignored);
* a Lightning ``model.ckpt`` of :class:`anomalib_anomalyclip.AnomalyCLIP` (its
  ``model.prompt_learner.*`` tensors).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer
from torch import nn

from anomalib_anomalyclip.errors import PromptCheckpointError

CHECKPOINT_FORMAT_KEY = "anomalyclip_prompts"
CHECKPOINT_FORMAT_VERSION = 1
AGNOSTIC_OBJECT = "object"
LIGHTNING_PREFIX = "model.prompt_learner."


PromptTypeName = Literal["object_agnostic", "object_aware"]


class PromptType(str, Enum):
    """Object-agnostic prompts (the method) or object-aware ones (the paper's ablation)."""

    OBJECT_AGNOSTIC = "object_agnostic"
    OBJECT_AWARE = "object_aware"


@dataclass(frozen=True)
class PromptConfig:
    """Shape of the learnable prompts.

    Args:
        width: CLIP text width (768 for ViT-L/14@336).
        n_ctx: learnable context vectors per sentence.
        text_token_depth: learnable text-encoder tokens go into blocks 2..depth.
        text_token_length: how many hidden positions those tokens overwrite.
        text_tokens: whether text-encoder tokens are used at all.
        prompt_type: object-agnostic or object-aware.
    """

    width: int
    n_ctx: int = 12
    text_token_depth: int = 9
    text_token_length: int = 4
    text_tokens: bool = True
    prompt_type: PromptType = PromptType.OBJECT_AGNOSTIC

    @property
    def text_token_layers(self) -> int:
        """Number of text blocks that receive learnable tokens."""
        return max(self.text_token_depth - 1, 0) if self.text_tokens else 0


class PromptLearner(nn.Module):
    """The learnable prompt parameters (about 43 K numbers for ViT-L/14@336).

    Args:
        config: the prompt shape.
        generator: random generator for the N(0, 0.02) initialisation.
    """

    def __init__(self, config: PromptConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = config
        self.normal_context = nn.Parameter(_init_normal((config.n_ctx, config.width), generator))
        self.abnormal_context = nn.Parameter(_init_normal((config.n_ctx, config.width), generator))
        self.text_tokens = nn.ParameterList(
            nn.Parameter(_init_normal((config.text_token_length, config.width), generator))
            for _ in range(config.text_token_layers)
        )

    def load_checkpoint(self, path: str | Path) -> None:
        """Load prompts from our checkpoint format or the reference's released format.

        Args:
            path: the checkpoint file.

        Raises:
            PromptCheckpointError: the file is missing, of an unknown format, or made for
                another configuration.
        """
        self.load_prompt_state(read_prompt_checkpoint(path), source=str(path))

    def load_prompt_state(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        """Copy prompt tensors (in our key layout) into this learner after checking their shapes."""
        expected = {name: tuple(tensor.shape) for name, tensor in self.state_dict().items()}
        found = {name: tuple(tensor.shape) for name, tensor in state.items()}
        problems = _describe_mismatch(expected, found, self.config)
        if problems:
            raise PromptCheckpointError(f"Prompt checkpoint {source} does not fit this model: {problems}")
        with torch.no_grad():
            for name, parameter in self.state_dict(keep_vars=True).items():
                parameter.copy_(state[name].to(parameter.dtype))


def save_prompts(learner: PromptLearner, path: str | Path) -> Path:
    """Write the learner's prompts in our checkpoint format and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {**asdict(learner.config), "prompt_type": learner.config.prompt_type.value}
    state = {name: tensor.detach().cpu().clone() for name, tensor in learner.state_dict().items()}
    torch.save({CHECKPOINT_FORMAT_KEY: CHECKPOINT_FORMAT_VERSION, "config": config, "state_dict": state}, path)
    return path


def read_prompt_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a prompt checkpoint of either format into our key layout.

    Args:
        path: the checkpoint file.

    Returns:
        ``normal_context``, ``abnormal_context`` and ``text_tokens.N`` tensors.

    Raises:
        PromptCheckpointError: the file is missing or holds no prompts.
    """
    path = Path(path)
    if not path.is_file():
        raise PromptCheckpointError(
            f"Prompt checkpoint '{path}' does not exist. Pass an existing file with --model.prompt_weights."
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise PromptCheckpointError(f"Cannot read prompt checkpoint '{path}': {error}") from error
    if isinstance(checkpoint, Mapping) and CHECKPOINT_FORMAT_KEY in checkpoint:
        return dict(checkpoint["state_dict"])
    if isinstance(checkpoint, Mapping) and "prompt_learner" in checkpoint:
        return convert_reference_state(checkpoint["prompt_learner"])
    prompts = prompts_of_lightning_checkpoint(checkpoint)
    if prompts:
        return prompts
    raise PromptCheckpointError(
        f"'{path}' is not a prompt checkpoint: expected a file written by anomalib-anomalyclip (prompts or a "
        "Lightning model.ckpt) or the reference's released format {'prompt_learner': {...}} "
        "(AnomalyCLIP checkpoints/*/epoch_15.pth)."
    )


def prompts_of_lightning_checkpoint(checkpoint: object) -> dict[str, torch.Tensor]:
    """The prompt tensors of an anomalib/Lightning checkpoint of AnomalyCLIP (empty if none)."""
    state = checkpoint.get("state_dict") if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping):
        return {}
    return {key[len(LIGHTNING_PREFIX) :]: value for key, value in state.items() if key.startswith(LIGHTNING_PREFIX)}


def convert_reference_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the reference ``AnomalyCLIP_PromptLearner`` state dict onto our key layout.

    ``ctx_pos``/``ctx_neg`` (1, 1, n_ctx, width) become the normal/abnormal context;
    ``compound_prompts_text.N`` become ``text_tokens.N``. The projection layers and
    token buffers of the reference are not used by its forward and are ignored.
    """
    missing = [key for key in ("ctx_pos", "ctx_neg") if key not in state]
    if missing:
        raise PromptCheckpointError(f"Reference prompt state lacks {missing}; it is not an AnomalyCLIP prompt learner.")
    converted = {
        "normal_context": state["ctx_pos"].reshape(-1, state["ctx_pos"].shape[-1]),
        "abnormal_context": state["ctx_neg"].reshape(-1, state["ctx_neg"].shape[-1]),
    }
    prefix = "compound_prompts_text."
    for key, tensor in state.items():
        if key.startswith(prefix):
            converted[f"text_tokens.{key[len(prefix) :]}"] = tensor
    return converted


def _describe_mismatch(expected: dict[str, tuple], found: dict[str, tuple], config: PromptConfig) -> str:
    if expected == found:
        return ""
    problems = []
    context = found.get("normal_context")
    if context is not None and context != expected["normal_context"]:
        if context[1] != config.width:
            problems.append(
                f"it was made for a CLIP text width of {context[1]}, but this backbone's text width is "
                f"{config.width} (use the backbone the prompts were trained with)"
            )
        if context[0] != config.n_ctx:
            problems.append(f"it has n_ctx={context[0]} context vectors, the model n_ctx={config.n_ctx}")
    found_layers = sum(key.startswith("text_tokens.") for key in found)
    if found_layers != config.text_token_layers:
        problems.append(
            f"it has learnable tokens for {found_layers} text blocks (text_token_depth={found_layers + 1}), the model "
            f"for {config.text_token_layers} (text_token_depth={config.text_token_depth}, "
            f"text_tokens={config.text_tokens})"
        )
    tokens = found.get("text_tokens.0")
    if tokens is not None and config.text_token_layers and tokens[0] != config.text_token_length:
        problems.append(
            f"its text tokens have length {tokens[0]}, the model text_token_length={config.text_token_length}"
        )
    if not problems:
        problems.append(f"expected tensors {expected}, found {found}")
    return "; ".join(problems) + "."


def _init_normal(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(shape, generator=generator) * 0.02


class PromptTextEncoder(nn.Module):
    """CLIP's text transformer, run on the learnable prompts.

    Args:
        clip: an open_clip ``CLIP`` model (frozen); its text tower is used.
        config: the prompt shape.
    """

    def __init__(self, clip: nn.Module, config: PromptConfig) -> None:
        super().__init__()
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)
        self.config = config
        self.context_length = clip.positional_embedding.shape[0]
        self._tokenizer = SimpleTokenizer(context_length=self.context_length)
        self._token_cache: dict[str, torch.Tensor] = {}
        if config.text_token_layers >= len(self.transformer.resblocks):
            raise ValueError(
                f"text_token_depth={config.text_token_depth} needs more than the text encoder's "
                f"{len(self.transformer.resblocks)} blocks."
            )

    def sentences(self, class_name: str) -> tuple[str, str]:
        """The normal and abnormal sentences for ``class_name`` (context words as ``X``)."""
        name = AGNOSTIC_OBJECT if self.config.prompt_type is PromptType.OBJECT_AGNOSTIC else class_name
        name = name.replace("_", " ")
        placeholder = " ".join(["X"] * self.config.n_ctx)
        return f"{placeholder} {name}.", f"{placeholder} damaged {name}."

    def tokens(self, class_name: str) -> torch.Tensor:
        """Token ids (2, context_length) of the normal and abnormal sentence."""
        name = AGNOSTIC_OBJECT if self.config.prompt_type is PromptType.OBJECT_AGNOSTIC else class_name
        if name not in self._token_cache:
            self._token_cache[name] = self._tokenizer(list(self.sentences(name)))
        return self._token_cache[name].to(self.token_embedding.weight.device)

    def forward(self, learner: PromptLearner, class_names: Sequence[str] = (AGNOSTIC_OBJECT,)) -> torch.Tensor:
        """Encode the prompts.

        Args:
            learner: the learnable prompts.
            class_names: one name per requested text embedding pair (ignored by the
                object-agnostic prompts, which always say ``object``).

        Returns:
            L2-normalised text features (len(class_names), 2, D): ``[:, 0]`` normal,
            ``[:, 1]`` abnormal.
        """
        tokens = torch.cat([self.tokens(name) for name in class_names])
        context = torch.stack([learner.normal_context, learner.abnormal_context]).repeat(len(class_names), 1, 1)
        embedded = self.token_embedding(tokens)
        n_ctx = self.config.n_ctx
        x = torch.cat([embedded[:, :1], context.to(embedded.dtype), embedded[:, 1 + n_ctx :]], dim=1)
        x = x + self.positional_embedding
        x = self._transformer(x, learner.text_tokens)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)] @ self.text_projection
        return F.normalize(x, dim=-1).reshape(len(class_names), 2, -1)

    def _transformer(self, x: torch.Tensor, text_tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        batch_first = getattr(self.transformer, "batch_first", True)
        length = self.config.text_token_length
        for index, block in enumerate(self.transformer.resblocks):
            if 1 <= index <= len(text_tokens):
                # The reference casts the expanded tokens to float16 before inserting them
                # (values and gradients are rounded); its released prompts were trained so.
                inserted = text_tokens[index - 1].expand(x.shape[0], -1, -1).half().to(x.dtype)
                x = torch.cat([x[:, :1], inserted, x[:, 1 + length :]], dim=1)
            x = (
                block(x, attn_mask=self.attn_mask)
                if batch_first
                else block(x.transpose(0, 1), attn_mask=self.attn_mask).transpose(0, 1)
            )
        return x

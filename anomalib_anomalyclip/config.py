"""The model's configuration: one frozen dataclass per capability, checked where it is made.

:class:`~anomalib_anomalyclip.AnomalyCLIP` takes a few plain arguments (``backbone``, ``pretrained``,
``image_size``, ``prompt_weights``, ``k_shot``: anomalib's and users' names) and one group per capability. On the
command line a group's fields are nested arguments (``--model.mutual.fraction 0.25``, ``--model.dpam.kind qq``), in
YAML a mapping (``mutual: {fraction: 0.25}``). The two capabilities that are off by default have an ``enabled``
field, and one short flag switches each on: ``--model.mutual true`` and ``--model.tiling true`` (the command line
reads them as ``--model.mutual.enabled true``; in YAML ``mutual: true`` or ``mutual: {enabled: true}``; in Python
``mutual=True`` or ``mutual=MutualScoring(enabled=True)``). Their other fields alone do not switch them on.

Each group checks its values when it is made and says what is wrong with the package's one-line errors. Models,
checkpoints and ``config.yaml`` files written before the groups existed used flat arguments (``mutual_scoring``,
``tile_size``, ``dpam_kind``...): :func:`upgrade` turns those into groups; checkpoint loading and the command line
both use it (see :data:`FLAT_ARGUMENTS` for each old name's new spelling).
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal, TypeVar

from anomalib_anomalyclip.errors import AnomalyCLIPError, ChoiceError
from anomalib_anomalyclip.method.dpam import DpamKindName, TokenPathName
from anomalib_anomalyclip.method.few_shot import FewShotFusionName
from anomalib_anomalyclip.method.loss import LossName
from anomalib_anomalyclip.method.mutual import MutualScoring
from anomalib_anomalyclip.method.prompts import PromptTypeName

__all__ = [
    "FLAT_ARGUMENTS",
    "AnomalyCLIPConfig",
    "ConfigurationError",
    "Dpam",
    "FeatureCaching",
    "FewShot",
    "MutualScoring",
    "Prompts",
    "Tiling",
    "Training",
    "accepts_flat_arguments",
    "as_group",
    "flat_argument_notes",
    "is_flat",
    "upgrade",
]

TileFusionName = Literal["mean", "max", "tiles"]
StorageDtypeName = Literal["float32", "float16"]
DEFAULT_SEED = 111  # the reference implementation's seed

logger = logging.getLogger(__name__)


class ConfigurationError(AnomalyCLIPError, ValueError):
    """A value of the model's configuration is out of range (the message names the argument and the valid range)."""


def _check_choice(value: str, choices: tuple[str, ...], argument: str) -> None:
    if value not in choices:
        valid = ", ".join(repr(choice) for choice in choices)
        raise ChoiceError(f"{argument} must be one of {valid}, got {value!r}.")


def _choices(name: Any) -> tuple[str, ...]:
    return tuple(name.__args__)


def _check_positive(value: float, argument: str, what: str) -> None:
    if isinstance(value, bool) or not value > 0:
        raise ConfigurationError(f"{argument} must be positive ({what}), got {value!r}.")


@dataclass(frozen=True)
class Prompts:
    """The learnable prompts and the text encoder's learnable tokens.

    Args:
        n_ctx: learnable context vectors per prompt (``[V1..Vn] object.``).
        text_token_depth: learnable text-encoder tokens go into text blocks 2..depth.
        text_token_length: learnable tokens per text block.
        text_tokens: use the text-encoder tokens (an ablation switches them off).
        type: ``object_agnostic`` (the method) or ``object_aware`` (an ablation).
        class_name: object name of object-aware prompts; ``None`` takes the datamodule's category.
        seed: seed of the prompts' initialisation (``None``: torch's global generator).
    """

    n_ctx: int = 12
    text_token_depth: int = 9
    text_token_length: int = 4
    text_tokens: bool = True
    type: PromptTypeName = "object_agnostic"
    class_name: str | None = None
    seed: int | None = DEFAULT_SEED

    def __post_init__(self) -> None:
        _check_choice(self.type, _choices(PromptTypeName), "prompts.type")
        _check_positive(self.n_ctx, "prompts.n_ctx", "context vectors per prompt")
        _check_positive(self.text_token_length, "prompts.text_token_length", "tokens per text block")


@dataclass(frozen=True)
class Training:
    """Prompt learning in ``fit`` (the glocal loss, Adam over the prompts only).

    Args:
        learn: learn the prompts in ``fit``; ``None``: learn them when no ``prompt_weights`` are given; ``true`` with
            ``prompt_weights`` fine-tunes them.
        lr: Adam learning rate.
        betas: Adam betas.
        loss: ``glocal`` (default), ``global`` (the image loss only) or ``local`` (the maps only).
        local_loss_weight: weight of the focal + dice map losses.
        epochs: training epochs (sets the trainer's ``max_epochs``).
    """

    learn: bool | None = None
    lr: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.999)
    loss: LossName = "glocal"
    local_loss_weight: float = 4.0
    epochs: int = 15

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        _check_choice(self.loss, _choices(LossName), "training.loss")
        _check_positive(self.lr, "training.lr", "the Adam step size")


@dataclass(frozen=True)
class Dpam:
    """The dual-path visual features (DPAM) and the anomaly maps made of them.

    Args:
        kind: attention of the second path: ``vv`` (default), ``qq``, ``kk`` or ``none`` (no DPAM, an ablation).
        start_layer: first visual block (1-indexed) with the DPAM path.
        feature_layers: visual blocks whose patch tokens make the maps; ``None``: the last block, as in the released
            code. ``[6, 12, 18, 24]``: the paper's text.
        smoothing_sigma: Gaussian smoothing of the map in pixels (0: off).
    """

    kind: DpamKindName = "vv"
    start_layer: int = 6
    feature_layers: tuple[int, ...] | None = None
    smoothing_sigma: float = 4.0

    def __post_init__(self) -> None:
        if self.feature_layers is not None:
            object.__setattr__(self, "feature_layers", tuple(self.feature_layers))
        _check_choice(self.kind, _choices(DpamKindName), "dpam.kind")
        if self.smoothing_sigma < 0:
            raise ConfigurationError(f"dpam.smoothing_sigma must be 0 (off) or positive, got {self.smoothing_sigma}.")


@dataclass(frozen=True)
class FewShot:
    """The few-shot memory bank of normal references (used when ``k_shot`` is positive).

    Args:
        source: a folder of normal reference images; ``None``: the datamodule's train split.
        layers: visual blocks of the bank; ``None``: the feature layers.
        tokens: ``dpam`` (the tokens that make the zero-shot maps, no extra cost) or ``original`` (the ordinary
            attention stream of the same blocks).
        fusion: ``mean`` (default), ``harmonic`` or ``few_shot`` (the few-shot map alone).
        seed: seed of the choice of ``k_shot`` references among the available normal images.
    """

    source: str | None = None
    layers: tuple[int, ...] | None = None
    tokens: TokenPathName = "dpam"
    fusion: FewShotFusionName = "mean"
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))
        _check_choice(self.tokens, _choices(TokenPathName), "few_shot.tokens")
        _check_choice(self.fusion, _choices(FewShotFusionName), "few_shot.fusion")


@dataclass(frozen=True)
class Tiling:
    """Tiled inference for small defects on large images (see :mod:`anomalib_anomalyclip.method.tiling`).

    Args:
        enabled: tile (``--model.tiling true`` for short); anomalib's ``TilerConfigurationCallback`` switches tiling on
            too, with its tiles and this group's working size and fusion.
        tile_size: side of a tile; it must be ``image_size`` (``None``: ``image_size``).
        stride: step between tiles, at most the tile size; ``None``: the tile size.
        working_size: (height, width) or side the images are resized to before tiling; ``None``: each image's own
            size.
        fusion: ``mean`` (tiles and a global view of the whole image, averaged), ``max``, or ``tiles`` alone.
    """

    enabled: bool = False
    tile_size: int | None = None
    stride: int | tuple[int, int] | None = None
    working_size: int | tuple[int, int] | None = None
    fusion: TileFusionName = "mean"

    def __post_init__(self) -> None:
        for name in ("stride", "working_size"):
            value = getattr(self, name)
            if isinstance(value, Sequence) and not isinstance(value, str):
                object.__setattr__(self, name, tuple(value))
        _check_choice(self.fusion, _choices(TileFusionName), "tiling.fusion")


@dataclass(frozen=True)
class FeatureCaching:
    """The feature cache of prompt training (see :mod:`anomalib_anomalyclip.integration.feature_cache`).

    Args:
        enabled: compute the frozen visual features of each training image once and reuse them in later epochs
            (switched off automatically for randomly augmented training images).
        dir: folder of a persistent, memory-mapped cache that later runs with the same features reuse; ``None``: in
            memory when it fits, else a temporary folder below the trainer's ``default_root_dir``.
        dtype: storage precision: ``float32`` (the features as computed) or ``float16`` (half the size).
    """

    enabled: bool = True
    dir: str | None = None
    dtype: StorageDtypeName = "float32"

    def __post_init__(self) -> None:
        _check_choice(self.dtype, _choices(StorageDtypeName), "feature_cache.dtype")


GroupT = TypeVar("GroupT")
GROUPS: dict[str, type] = {
    "prompts": Prompts,
    "training": Training,
    "dpam": Dpam,
    "few_shot": FewShot,
    "mutual": MutualScoring,
    "tiling": Tiling,
    "feature_cache": FeatureCaching,
}
"""The model's argument of each group, and its class."""
SWITCHED = ("mutual", "tiling")
"""Groups with an ``enabled`` field, off by default (``true`` stands for ``{enabled: true}``)."""


def as_group(group: type[GroupT], value: GroupT | Mapping[str, Any] | bool | None, argument: str) -> GroupT:
    """``value`` as a ``group``: itself, a mapping of its fields, or (for a switched group) ``True``/``False``.

    ``None`` gives the defaults.

    Raises:
        ConfigurationError: a mapping names fields the group does not have (the message lists its fields).
    """
    if value is None:
        return group()
    if isinstance(value, bool) and argument in SWITCHED:
        return group(enabled=value)
    if isinstance(value, group):
        return value
    if isinstance(value, Mapping):
        known = {item.name for item in fields(group)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigurationError(
                f"{argument} has no field {', '.join(map(repr, unknown))}; its fields are {', '.join(sorted(known))}."
            )
        return group(**value)
    raise ConfigurationError(f"{argument} must be a {group.__name__} or a mapping of its fields, got {value!r}.")


@dataclass(frozen=True)
class AnomalyCLIPConfig:
    """Everything :class:`~anomalib_anomalyclip.AnomalyCLIP` is built from, except anomalib's components.

    The groups are those of :data:`GROUPS`. See the model's arguments for the plain fields.
    """

    backbone: str = "ViT-L-14-336"
    pretrained: str | None = "openai"
    image_size: int = 518
    prompt_weights: str | None = None
    k_shot: int = 0
    prompts: Prompts = field(default_factory=Prompts)
    training: Training = field(default_factory=Training)
    dpam: Dpam = field(default_factory=Dpam)
    few_shot: FewShot = field(default_factory=FewShot)
    mutual: MutualScoring = field(default_factory=MutualScoring)
    tiling: Tiling = field(default_factory=Tiling)
    feature_cache: FeatureCaching = field(default_factory=FeatureCaching)
    normal_quantile: float = 0.99
    preprocessing: Literal["reference", "fast"] = "reference"
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.k_shot, bool) or self.k_shot < 0:
            raise ConfigurationError(
                f"k_shot must be 0 (zero-shot) or a positive number of reference images, got {self.k_shot}."
            )
        _check_positive(self.image_size, "image_size", "the side of the square input in pixels")
        if not 0 < self.normal_quantile < 1:
            raise ConfigurationError(
                f"normal_quantile must lie in (0, 1) (1 - normal_quantile is the accepted false-alarm rate on normal "
                f"images), got {self.normal_quantile}."
            )
        _check_choice(self.preprocessing, ("reference", "fast"), "preprocessing")
        for name in SWITCHED:
            _warn_when_set_but_off(name, getattr(self, name))

    @classmethod
    def from_arguments(cls, **arguments: Any) -> AnomalyCLIPConfig:
        """The configuration of the model's arguments: groups as dataclasses, mappings or switches."""
        groups = {name: as_group(group, arguments.pop(name, None), name) for name, group in GROUPS.items()}
        return cls(**arguments, **groups)

    def hyper_parameters(self) -> dict[str, Any]:
        """Plain values (groups as mappings): what checkpoints and logs keep."""
        values = {item.name: getattr(self, item.name) for item in fields(self)}
        return {name: asdict(value) if name in GROUPS else value for name, value in values.items()}


FLAT_ARGUMENTS: dict[str, str] = {
    "train_prompts": "training.learn",
    "lr": "training.lr",
    "betas": "training.betas",
    "loss": "training.loss",
    "local_loss_weight": "training.local_loss_weight",
    "epochs": "training.epochs",
    "n_ctx": "prompts.n_ctx",
    "text_token_depth": "prompts.text_token_depth",
    "text_token_length": "prompts.text_token_length",
    "text_tokens": "prompts.text_tokens",
    "prompt_type": "prompts.type",
    "class_name": "prompts.class_name",
    "seed": "prompts.seed",
    "dpam_kind": "dpam.kind",
    "dpam_start_layer": "dpam.start_layer",
    "feature_layers": "dpam.feature_layers",
    "smoothing_sigma": "dpam.smoothing_sigma",
    "feature_cache_dir": "feature_cache.dir",
    "feature_cache_dtype": "feature_cache.dtype",
    "few_shot_source": "few_shot.source",
    "few_shot_layers": "few_shot.layers",
    "few_shot_tokens": "few_shot.tokens",
    "few_shot_fusion": "few_shot.fusion",
    "mutual_scoring": "mutual.enabled",
    "mutual_blocks": "mutual.blocks",
    "mutual_radii": "mutual.radii",
    "mutual_fraction": "mutual.fraction",
    "mutual_pool_size": "mutual.pool_size",
    "rscin_k": "mutual.rscin_k",
    "mutual_fusion": "mutual.fusion",
    "tile_size": "tiling.tile_size",
    "tile_stride": "tiling.stride",
    "tile_working_size": "tiling.working_size",
    "tile_fusion": "tiling.fusion",
}
"""Each flat argument of the models written before the groups, and its new spelling (``feature_cache``, a flag
then, became ``feature_cache.enabled``; ``tile_size`` also switches ``tiling.enabled`` on; ``seed`` also seeds
``few_shot.seed`` and ``mutual.seed``, as it did)."""


def is_flat(arguments: Mapping[str, Any]) -> bool:
    """Whether ``arguments`` are the model's arguments as written before the groups."""
    return any(name in FLAT_ARGUMENTS for name in arguments) or isinstance(arguments.get("feature_cache"), bool)


def upgrade(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The model's arguments with flat (old) names turned into groups; arguments already grouped pass unchanged.

    The values mean what they meant: ``mutual_scoring`` becomes ``mutual.enabled``; ``tile_size`` (set) switches
    ``tiling.enabled`` on (the other ``tile_*`` values alone served anomalib's ``TilerConfigurationCallback``, as
    ``tiling``'s fields do now); ``seed`` seeds the prompts, the choice of references and the split of pools
    (``None`` meant 0 for the last two). A switched group given as ``true``/``false`` becomes ``{enabled: ...}``.

    Args:
        arguments: the model's arguments (``init_args`` of a ``config.yaml``, a checkpoint's hyper-parameters).
    """
    upgraded: dict[str, Any] = {}
    groups: dict[str, dict[str, Any]] = {name: {} for name in GROUPS}
    for name, value in arguments.items():
        if name == "feature_cache" and isinstance(value, bool):
            groups["feature_cache"]["enabled"] = value
        elif name in SWITCHED and isinstance(value, bool):
            groups[name]["enabled"] = value
        elif name in FLAT_ARGUMENTS:
            group, _, member = FLAT_ARGUMENTS[name].partition(".")
            groups[group][member] = value
        else:
            upgraded[name] = value
    if "tile_size" in arguments:
        groups["tiling"]["enabled"] = arguments["tile_size"] is not None
    if "seed" in arguments:
        groups["few_shot"]["seed"] = groups["mutual"]["seed"] = arguments["seed"] or 0
    for name, values in groups.items():
        if values:
            upgraded[name] = _merged(upgraded.get(name), values)
    return upgraded


def _merged(given: Any, values: dict[str, Any]) -> Any:
    """A group given (a mapping, a dataclass or nothing) with ``values`` of flat arguments on top."""
    if isinstance(given, Mapping):
        return {**given, **values}
    if given is None:
        return dict(values)
    return replace(given, **values)


def _warn_when_set_but_off(name: str, group: Any) -> None:
    """Log that a switched-off group's settings do nothing (its seed aside: flat ``seed`` values seed it always)."""
    defaults = type(group)()
    changed = [
        item.name
        for item in fields(group)
        if item.name != "seed" and getattr(group, item.name) != getattr(defaults, item.name)
    ]
    if not group.enabled and changed:
        logger.warning(
            "%s.%s given, but %s is off: switch it on with --model.%s true (or %s: {enabled: true}).",
            name, "/".join(changed), name, name, name,
        )  # fmt: skip


def flat_argument_notes(arguments: Mapping[str, Any], prefix: str = "") -> list[str]:
    """One note per flat argument of ``arguments``, naming its new spelling (``prefix``: e.g. ``--model.``)."""
    notes = []
    for name in arguments:
        if name == "feature_cache" and isinstance(arguments[name], bool):
            notes.append(f"{prefix}feature_cache is now {prefix}feature_cache.enabled")
        elif name in FLAT_ARGUMENTS:
            notes.append(f"{prefix}{name} is now {prefix}{FLAT_ARGUMENTS[name]}")
    return notes


def accepts_flat_arguments(init: Callable[..., None]) -> Callable[..., None]:
    """Let a model's ``__init__`` take the flat keyword arguments of earlier versions, upgraded, with a warning.

    The signature stays ``init``'s (jsonargparse and ``inspect.signature`` read the groups).
    """

    @functools.wraps(init)
    def upgrading_init(self: Any, *args: Any, **kwargs: Any) -> None:
        if is_flat(kwargs):
            notes = "; ".join(flat_argument_notes(kwargs))
            warnings.warn(f"{type(self).__name__}: arguments are grouped now: {notes}.", FutureWarning, stacklevel=2)
            kwargs = upgrade(kwargs)
        init(self, *args, **kwargs)

    return upgrading_init

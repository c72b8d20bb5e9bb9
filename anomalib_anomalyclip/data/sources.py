"""The specification of one labelled source of auxiliary images: :class:`SourceSpec`.

A source is written in YAML or on the command line as a flat mapping, e.g. ``{format: mvtec, root:
./datasets/MVTecAD}``; jsonargparse (anomalib's CLI) builds a :class:`SourceSpec` from it and rejects, from the type
hints alone, an unknown ``format`` (listing the valid ones), an unknown key or a value of the wrong type. From Python,
:meth:`SourceSpec.from_mapping` turns a plain mapping into one with the same checks. What types cannot say (a key that
does not apply to the source's format, a ``folder`` source without folders, option ranges) is checked when a
specification is made; whether the paths exist is checked when the source is scanned (:mod:`.scanners`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from anomalib_anomalyclip.data.anomaly_synthesis import SyntheticOptions
from anomalib_anomalyclip.data.images import normalise_extensions

__all__ = ["SOURCE_FORMATS", "SourceFormat", "SourceSpec", "source_specs"]

SourceFormat = Literal["mvtec", "visa", "folder", "synthetic"]
SOURCE_FORMATS: tuple[str, ...] = get_args(SourceFormat)

_EXAMPLE = "{format: mvtec, root: ./datasets/MVTecAD}"
_SYNTHETIC_FIELDS = frozenset(option.name for option in fields(SyntheticOptions))
_COMMON_FIELDS = frozenset({"format", "root", "extensions", "require_masks"})
_FORMAT_FIELDS: dict[str, frozenset[str]] = {
    "mvtec": frozenset({"categories"}),
    "visa": frozenset({"categories"}),
    "folder": frozenset({"name", "normal_dir", "abnormal_dir", "mask_dir"}),
    "synthetic": frozenset({"categories", "name", "normal_dir"}) | _SYNTHETIC_FIELDS,
}


def _as_tuple(value: str | os.PathLike | Sequence[str] | None) -> tuple[str, ...]:
    """Turn ``None``, a string or a sequence of strings into a tuple of strings."""
    if value is None:
        return ()
    if isinstance(value, str | os.PathLike):
        return (os.fspath(value),)
    return tuple(os.fspath(item) for item in value)


def _is_default(value: Any, option: Field) -> bool:
    """Whether ``value`` is the field's default (jsonargparse passes every default, sequences as lists)."""
    return (tuple(value) if isinstance(value, list) else value) == option.default


@dataclass(frozen=True)
class SourceSpec:
    """One labelled source of auxiliary images (see :mod:`~anomalib_anomalyclip.data.auxiliary` for the formats).

    Paths are made absolute (relative ones against the current directory) and folder lists become tuples when the
    specification is made.

    Attributes:
        format: The layout of the source: ``mvtec``, ``visa``, ``folder`` or ``synthetic``.
        root: Dataset root.
        categories: ``mvtec``/``visa``/``synthetic``: categories to use; empty means every category found.
        name: ``folder``/``synthetic``: category name of its images (default: the root folder's name).
        normal_dir: ``folder``/``synthetic``: folders of normal images, relative to ``root``.
        abnormal_dir: ``folder``: folders of anomalous images, relative to ``root``.
        mask_dir: ``folder``: mask folders, relative to ``root``; one shared folder or one per ``abnormal_dir``.
        extensions: Image file extensions (case-insensitive); ``None``: the common image formats (masks may also
            have any of those).
        require_masks: If true, an anomalous image without a mask file is an error (except in a ``folder`` source
            without ``mask_dir``, whose images are labelled per image only); if false it is kept without a mask.
        anomalous_fraction: ``synthetic``: share of anomalous samples, in ``(0, 1)``.
        seed: ``synthetic``: seed of the anomalies.
        texture_dir: ``synthetic``: folder of texture images for the anomalous regions (default: Perlin noise).
        regenerate: ``synthetic``: new anomalies every epoch.
        output_dir: ``synthetic``: folder for the generated files (default: the package cache).
        blend_factor: ``synthetic``: opacity of the anomalies, a number or a ``(min, max)`` pair within ``(0, 1]``.
        index: Position of the source in the datamodule's ``sources`` (shown in messages; see :meth:`numbered`).
        synthetic: ``synthetic`` sources: their options (see :mod:`~anomalib_anomalyclip.data.anomaly_synthesis`).

    Raises:
        ValueError: If ``format`` is not one of :data:`SOURCE_FORMATS`, ``root`` is empty, a key is set that does
            not apply to the format, a ``folder`` source lists no folder or as many mask folders as anomalous ones,
            or a ``synthetic`` option is out of range.
    """

    format: SourceFormat
    root: str | Path
    categories: str | Sequence[str] = ()
    name: str = ""
    normal_dir: str | Sequence[str] = ()
    abnormal_dir: str | Sequence[str] = ()
    mask_dir: str | Sequence[str] = ()
    extensions: str | Sequence[str] | None = None
    require_masks: bool = True
    anomalous_fraction: float = SyntheticOptions.anomalous_fraction
    seed: int = SyntheticOptions.seed
    texture_dir: str | Path | None = SyntheticOptions.texture_dir
    regenerate: bool = SyntheticOptions.regenerate
    output_dir: str | Path | None = SyntheticOptions.output_dir
    blend_factor: float | tuple[float, float] = SyntheticOptions.blend_factor
    index: int = field(default=0, init=False, compare=False)
    synthetic: SyntheticOptions | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.format not in SOURCE_FORMATS:
            msg = f"`format` must be one of {list(SOURCE_FORMATS)}, got {self.format!r}."
            raise ValueError(msg)
        if not self.root:
            msg = f"a {self.format} source needs a `root` path."
            raise ValueError(msg)
        self._check_keys_apply()
        folders = ("categories", "normal_dir", "abnormal_dir", "mask_dir")
        normalised: dict[str, Any] = {key: _as_tuple(getattr(self, key)) for key in folders}
        normalised |= {
            "root": Path(os.path.abspath(Path(self.root).expanduser())),
            "name": str(self.name or ""),
            "extensions": normalise_extensions(self.extensions),
        }
        if self.format == "synthetic":
            normalised["synthetic"] = SyntheticOptions(**{key: getattr(self, key) for key in _SYNTHETIC_FIELDS})
        for key, value in normalised.items():
            object.__setattr__(self, key, value)
        self._check_folders()

    def _check_keys_apply(self) -> None:
        """Refuse keys set away from their default that the source's format does not use."""
        allowed = _COMMON_FIELDS | _FORMAT_FIELDS[self.format]
        unused = [
            option.name
            for option in fields(self)
            if option.init and option.name not in allowed and not _is_default(getattr(self, option.name), option)
        ]
        if unused:
            msg = f"key(s) {unused} do not apply to {self.format} sources, whose keys are {sorted(allowed)}."
            raise ValueError(msg)

    def _check_folders(self) -> None:
        """Check the folder lists of a ``folder`` source."""
        if self.format != "folder":
            return
        if not self.normal_dir and not self.abnormal_dir:
            msg = f"a folder source ({self.root}) needs `normal_dir` and/or `abnormal_dir` (folders below `root`)."
            raise ValueError(msg)
        if len(self.mask_dir) > 1 and len(self.mask_dir) != len(self.abnormal_dir):
            msg = (
                f"a folder source ({self.root}): `mask_dir` lists {len(self.mask_dir)} folders but `abnormal_dir` "
                f"lists {len(self.abnormal_dir)}; give one shared mask folder or one per abnormal folder."
            )
            raise ValueError(msg)

    @classmethod
    def from_mapping(cls, spec: Mapping[str, Any] | SourceSpec, index: int = 0) -> SourceSpec:
        """The specification of entry ``index`` of a datamodule's ``sources``, from a plain mapping.

        Args:
            spec: A mapping with at least ``format`` and ``root`` (the other keys are the attributes), or a
                specification.
            index: Position of the source in the datamodule's ``sources``.

        Returns:
            The specification, numbered ``index``.

        Raises:
            TypeError: If ``spec`` is neither a mapping nor a specification.
            ValueError: On a missing or unknown key, or any problem listed in the class docstring.
        """
        if isinstance(spec, SourceSpec):
            return spec.numbered(index)
        if not isinstance(spec, Mapping):
            msg = f"sources[{index}] must be a mapping such as {_EXAMPLE}, got {spec!r}."
            raise TypeError(msg)
        keys = {option.name: option for option in fields(cls) if option.init}
        unknown = sorted(set(spec) - set(keys))
        missing = [key for key, option in keys.items() if option.default is MISSING and key not in spec]
        if unknown or missing:
            problem = f"has unknown key(s) {unknown}" if unknown else f"needs {' and '.join(f'`{k}`' for k in missing)}"
            msg = f"sources[{index}] {problem}; the keys of a source are {sorted(keys)}."
            raise ValueError(msg)
        try:
            return cls(**spec).numbered(index)
        except ValueError as error:
            raise ValueError(f"sources[{index}]: {error}") from None

    def numbered(self, index: int) -> SourceSpec:
        """This specification as entry ``index`` of a datamodule's ``sources``."""
        numbered = copy.copy(self)
        object.__setattr__(numbered, "index", index)
        return numbered

    @property
    def label(self) -> str:
        """Short description used in messages, e.g. ``sources[0] (mvtec, /data/MVTecAD)``."""
        return f"sources[{self.index}] ({self.format}, {self.root})"

    @property
    def display_name(self) -> str:
        """Name of the source: its ``name``, else the root folder's name."""
        return self.name or Path(self.root).name


def source_specs(
    sources: Sequence[SourceSpec | Mapping[str, Any]] | None, root: str | Path | None
) -> tuple[SourceSpec, ...]:
    """The numbered specifications of a datamodule's ``sources``/``root`` arguments.

    Args:
        sources: Specifications or plain mappings.
        root: Shortcut for ``sources=[{"format": "mvtec", "root": root}]``.

    Returns:
        One specification per source, numbered by position.

    Raises:
        TypeError: If an entry is neither a mapping nor a specification.
        ValueError: If neither or both arguments are given, ``sources`` is empty, or a mapping is invalid.
    """
    if (sources is None) == (root is None):
        msg = (
            f"AuxiliaryDataModule needs exactly one of `sources` (a list such as [{_EXAMPLE}]) or `root` (a single "
            "MVTec-layout dataset)."
        )
        raise ValueError(msg)
    if root is not None:
        sources = [SourceSpec(format="mvtec", root=root)]
    if isinstance(sources, Mapping | SourceSpec) or not sources:
        msg = f"`sources` must be a non-empty list of sources such as [{_EXAMPLE}], got {sources!r}."
        raise ValueError(msg)
    return tuple(SourceSpec.from_mapping(spec, index) for index, spec in enumerate(sources))

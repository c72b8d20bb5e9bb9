"""Train prompts on one's own normal images, with anomalies synthesised by anomalib's Perlin generator.

A ``synthetic`` source of :class:`~anomalib_anomalyclip.data.AuxiliaryDataModule` takes normal images and turns them
into a labelled training set: every normal image stays a normal sample, and anomalous samples with pixel masks are
made from them by anomalib's :class:`~anomalib.data.utils.generators.perlin.PerlinAnomalyGenerator` (the generator of
DRAEM and GLASS): a Perlin-noise shaped region is blended with noise or, with ``texture_dir``, with a texture image
(e.g. DTD). Where the normal images are taken from (``root``):

* a folder of normal images (or ``normal_dir`` folders below ``root``); the category is ``name`` or the folder's name;
* an MVTec-layout category (``root/train/good/``);
* an MVTec-layout dataset (``root/<category>/train/good/``, every category unless ``categories`` lists some).

Options (keys of the source, fields of :class:`~anomalib_anomalyclip.data.sources.SourceSpec` and of
:class:`SyntheticOptions`):

``anomalous_fraction`` (default 0.5)
    Share of anomalous samples in the source's training set, in ``(0, 1)``. All normal images are kept; ``n`` normal
    images give ``round(n * f / (1 - f))`` anomalous ones, made from the normal images in a seeded order.
``seed`` (default 0)
    The synthetic set is a pure function of the normal images, the options and the seed.
``texture_dir``
    A folder of texture images that fill the anomalous regions (default: Perlin noise itself).
``regenerate`` (default false)
    New anomalies every epoch: the fixed set still serves validation, the training images get fresh anomalies each
    time they are loaded, and the feature cache is off (every epoch sees new pixels).
``output_dir``
    Where the anomalous images and masks are written (default: ``synthetic/`` in the package cache, see
    :mod:`anomalib_anomalyclip.cache`).
``blend_factor`` (default ``(0.5, 1.0)``)
    Opacity of the anomalies over the image: a number or a ``(min, max)`` range within ``(0, 1]``.

Fixed per seed: the anomalous images and masks are PNG files in a folder named by a digest of everything that makes
them (the normal images' paths, sizes and modification times, the options, the texture files), so the feature
cache, which keys on image paths, can never confuse two seeds, and a second run reuses the files. The folder's
``index.json`` lists them (:func:`read_index`, :func:`write_index`).

Experimental: prompts trained on these anomalies can lose accuracy on some categories
(docs/adaptation.md); with normal images only try ``k_shot`` first. At the start of ``fit``,
:class:`~anomalib_anomalyclip.data.synthetic_preview.SyntheticPreview` warns when a source's anomalies fall largely
on a plain background.

Example YAML::

    data:
      class_path: anomalib_anomalyclip.data.AuxiliaryDataModule
      init_args:
        sources:
          - {format: synthetic, root: ./datasets/MVTecAD/bottle, anomalous_fraction: 0.5, seed: 0}
          - {format: folder, root: ./my_defects, abnormal_dir: bad, mask_dir: masks}
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
from PIL import Image

from anomalib_anomalyclip.cache import cache_dir
from anomalib_anomalyclip.data.images import IMAGE_EXTENSIONS, BadImageError, list_image_files, read_image

__all__ = [
    "SYNTHETIC_LABEL",
    "SyntheticOptions",
    "anomaly_generator",
    "make_anomaly",
    "normal_image_groups",
    "read_index",
    "regeneration_plan",
    "synthesise",
    "synthetic_rows",
    "write_index",
]

logger = logging.getLogger(__name__)

SYNTHETIC_LABEL = "synthetic"
INDEX_NAME = "index.json"
_FORMAT_VERSION = 1
_MAX_TRIES = 20


@dataclass(frozen=True)
class SyntheticOptions:
    """Options of a ``synthetic`` source (see the module docstring), checked and normalised when made.

    Attributes:
        anomalous_fraction: share of anomalous samples, in ``(0, 1)``.
        seed: seed of the anomalies.
        texture_dir: folder of texture images for the anomalous regions, or ``None`` for Perlin noise.
        regenerate: new anomalies every epoch (the feature cache is then off).
        output_dir: folder for the generated files (default: ``synthetic/`` in the package cache).
        blend_factor: opacity of the anomaly over the image (anomalib's ``blend_factor``), a number or a
            ``(min, max)`` pair; stored as the pair.

    Raises:
        ValueError: if ``anomalous_fraction`` is outside ``(0, 1)`` or ``blend_factor`` is not within ``(0, 1]``.
    """

    anomalous_fraction: float = 0.5
    seed: int = 0
    texture_dir: str | Path | None = None
    regenerate: bool = False
    output_dir: str | Path | None = None
    blend_factor: float | tuple[float, float] = (0.5, 1.0)

    def __post_init__(self) -> None:
        fraction = float(self.anomalous_fraction)
        if not 0.0 < fraction < 1.0:
            msg = (
                "anomalous_fraction must lie strictly between 0 and 1 (the share of anomalous samples; 0.5 makes one "
                f"anomalous sample per normal image), got {fraction}."
            )
            raise ValueError(msg)
        blend = self.blend_factor
        blend = (float(blend), float(blend)) if isinstance(blend, int | float) else tuple(float(b) for b in blend)
        if len(blend) != 2 or not 0.0 < blend[0] <= blend[1] <= 1.0:
            msg = f"blend_factor must be a number or a (min, max) pair within (0, 1], got {blend}."
            raise ValueError(msg)
        normalised = {
            "anomalous_fraction": fraction,
            "seed": int(self.seed),
            "texture_dir": _absolute(self.texture_dir),
            "regenerate": bool(self.regenerate),
            "output_dir": _absolute(self.output_dir),
            "blend_factor": blend,
        }
        for key, value in normalised.items():
            object.__setattr__(self, key, value)

    def anomalous_count(self, normal_count: int) -> int:
        """Anomalous samples made from ``normal_count`` normal images (at least one)."""
        return max(1, round(normal_count * self.anomalous_fraction / (1.0 - self.anomalous_fraction)))


def _absolute(path: str | os.PathLike | None) -> Path | None:
    """``path`` made absolute against the current directory (``~`` expanded); ``None`` stays ``None``."""
    return Path(os.path.abspath(Path(path).expanduser())) if path else None


# --------------------------------------------------------------------------------------------------------------------
# Finding the normal images and the textures
# --------------------------------------------------------------------------------------------------------------------

_WHERE = (
    "a folder of normal images (or `normal_dir` folders below `root`), an MVTec-layout category "
    "(<root>/train/good/) or an MVTec-layout dataset (<root>/<category>/train/good/)"
)


def _images_or_none(folder: Path, extensions: Sequence[str]) -> list[Path]:
    try:
        return list_image_files(folder, extensions) if folder.is_dir() else []
    except BadImageError:
        return []


def _mvtec_categories(root: Path, selected: Sequence[str]) -> dict[str, Path]:
    """``<category> -> <root>/<category>/train/good`` for the MVTec-layout categories below ``root``."""
    found = {child.name: child / "train" / "good" for child in sorted(root.iterdir()) if (child / "train").is_dir()}
    if not selected:
        return found
    missing = sorted(set(selected) - set(found))
    if missing:
        msg = f"categories {missing} not found below {root}; available: {sorted(found)}."
        raise ValueError(msg)
    return {name: found[name] for name in selected}


def _normal_folders(
    root: Path, normal_dir: Sequence[str], categories: Sequence[str], name: str
) -> dict[str, list[Path]]:
    """Category name -> folders of normal images, by the layout found at ``root``."""
    if normal_dir:
        return {name or root.name: [root / folder for folder in normal_dir]}
    if (root / "train" / "good").is_dir():
        return {name or root.name: [root / "train" / "good"]}
    by_category = _mvtec_categories(root, categories)
    if by_category:
        return {category: [folder] for category, folder in by_category.items()}
    return {name or root.name: [root]}


def normal_image_groups(
    label: str,
    root: Path,
    normal_dir: Sequence[str] = (),
    categories: Sequence[str] = (),
    name: str = "",
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> dict[str, list[Path]]:
    """The normal images of a ``synthetic`` source, by category.

    Args:
        label: the source's description for messages.
        root: the source's root (see the module docstring for the layouts).
        normal_dir: folders of normal images below ``root``.
        categories: MVTec-layout dataset: the categories to use (default: all).
        name: category name of a folder or single category (default: the folder's name).
        extensions: image file extensions.

    Returns:
        Sorted image paths per category, each list non-empty.

    Raises:
        FileNotFoundError: if ``root`` does not exist or a category or folder holds no normal image.
    """
    if not root.is_dir():
        msg = f"{label}: root {root} does not exist or is not a folder. Give {_WHERE}."
        raise FileNotFoundError(msg)
    try:
        folders = _normal_folders(root, normal_dir, categories, name)
    except ValueError as error:
        raise ValueError(f"{label}: {error}") from None
    groups = {category: [p for f in dirs for p in _images_or_none(f, extensions)] for category, dirs in folders.items()}
    empty = [category for category, images in groups.items() if not images]
    if empty:
        where = ", ".join(str(folder) for category in empty for folder in folders[category])
        msg = (
            f"{label}: no normal images (extensions {list(extensions)}) in {where}. Synthetic anomalies are made "
            f"from normal images: give {_WHERE}."
        )
        raise FileNotFoundError(msg)
    return groups


def texture_files(label: str, texture_dir: Path | None) -> list[Path]:
    """The texture images of ``texture_dir`` (empty without one).

    Raises:
        FileNotFoundError: if the folder does not exist or holds no image.
    """
    if texture_dir is None:
        return []
    if not texture_dir.is_dir():
        msg = f"{label}: texture_dir {texture_dir} does not exist; give a folder of texture images such as DTD."
        raise FileNotFoundError(msg)
    textures = _images_or_none(texture_dir, (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"))
    if not textures:
        msg = (
            f"{label}: texture_dir {texture_dir} holds no images (.jpg, .png, ...); give a folder of texture images "
            "such as DTD's images/ folder, or leave texture_dir out to fill anomalies with Perlin noise."
        )
        raise FileNotFoundError(msg)
    return textures


# --------------------------------------------------------------------------------------------------------------------
# Generating
# --------------------------------------------------------------------------------------------------------------------


def anomaly_generator(options: SyntheticOptions, textures: Sequence[Path]) -> PerlinAnomalyGenerator:
    """The Perlin generator of anomalib, always applying an anomaly, built reproducibly from ``options.seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)  # the generator draws a solarisation threshold when it is built
        generator = PerlinAnomalyGenerator(probability=1.0, blend_factor=options.blend_factor)
    generator.anomaly_source_paths = list(textures)
    return generator


def make_anomaly(generator: PerlinAnomalyGenerator, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One anomalous version of ``image`` (3, H, W) in [0, 1], drawn from torch's global random state.

    Returns:
        The image (3, H, W) clamped to [0, 1] and its uint8 mask (H, W), which is never empty.
    """
    for _ in range(_MAX_TRIES):
        augmented, mask = generator(image.as_subclass(torch.Tensor))
        mask = (mask[0] > 0.5).to(torch.uint8)
        if mask.any():
            return augmented.clamp(0.0, 1.0), mask
    msg = f"anomalib's Perlin generator made an empty mask {_MAX_TRIES} times for an image of size {image.shape}."
    raise RuntimeError(msg)


def _seeded_anomaly(
    generator: PerlinAnomalyGenerator, image: torch.Tensor, seed: int, category: str, index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((seed * 1_000_003 + zlib.crc32(category.encode())) * 100_003 + index)
        return make_anomaly(generator, image)


def _signature(path: Path) -> list[Any]:
    status = path.stat()
    return [str(path), status.st_size, status.st_mtime_ns]


def _digest(category: str, images: Sequence[Path], options: SyntheticOptions, textures: Sequence[Path]) -> str:
    import anomalib

    header = {
        "version": _FORMAT_VERSION,
        "category": category,
        "images": [_signature(path) for path in images],
        "textures": [_signature(path) for path in textures],
        "fraction": options.anomalous_fraction,
        "seed": options.seed,
        "blend": list(options.blend_factor),
        "anomalib": anomalib.__version__,
        "torch": torch.__version__.split("+")[0],
    }
    return hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()[:16]


def _save_png(array: torch.Tensor, path: Path) -> None:
    Image.fromarray(array.numpy()).save(path)


def _generate(
    folder: Path, category: str, images: Sequence[Path], options: SyntheticOptions, textures: Sequence[Path]
) -> list:
    """Write the anomalous images and masks into ``folder``; the index entries ``[image, mask, source]``."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    generator = anomaly_generator(options, textures)
    order = np.random.default_rng(options.seed).permutation(len(images))
    entries = []
    for index in range(options.anomalous_count(len(images))):
        source = images[int(order[index % len(images)])]
        augmented, mask = _seeded_anomaly(generator, read_image(source), options.seed, category, index)
        image_path = folder / "images" / f"{index:04d}_{source.stem}.png"
        mask_path = folder / "masks" / f"{index:04d}_{source.stem}_mask.png"
        _save_png((augmented * 255).round().to(torch.uint8).permute(1, 2, 0), image_path)
        _save_png(mask * 255, mask_path)
        entries.append([str(image_path), str(mask_path), str(source)])
    return entries


def synthesise(
    category: str, images: Sequence[Path], options: SyntheticOptions, textures: Sequence[Path] = ()
) -> list[list[str]]:
    """The anomalous samples of one category, generated once per digest and reused afterwards.

    Args:
        category: category name.
        images: its normal images.
        options: the source's options.
        textures: texture images for the anomalous regions.

    Returns:
        ``[image, mask, source image]`` paths per anomalous sample.
    """
    digest = _digest(category, images, options, textures)
    folder = cache_dir("synthetic", options.output_dir) / f"{category}-{digest}"
    index = read_index(folder)
    if index is not None:
        entries = index["samples"]
        if all(Path(image).is_file() and Path(mask).is_file() for image, mask, _ in entries):
            return entries
    entries = _generate(folder, category, images, options, textures)
    write_index(folder, {"digest": digest, "samples": entries})
    logger.info("Synthetic anomalies: %d anomalous images of %r written to %s.", len(entries), category, folder)
    return entries


# --------------------------------------------------------------------------------------------------------------------
# Digest-named folders with an index (the feature cache keeps its files the same way; candidates for sharing)
# --------------------------------------------------------------------------------------------------------------------


def read_index(folder: Path) -> dict[str, Any] | None:
    """The ``index.json`` of a digest-named folder; ``None`` when it is missing or unreadable (then regenerate)."""
    try:
        return json.loads((folder / INDEX_NAME).read_text())
    except (OSError, ValueError):
        return None


def write_index(folder: Path, index: Mapping[str, Any]) -> None:
    """Write ``folder/index.json`` atomically: a reader sees the previous index or this one, never part of it."""
    path = folder / INDEX_NAME
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(index))
    temporary.replace(path)


# --------------------------------------------------------------------------------------------------------------------
# The rows of a source
# --------------------------------------------------------------------------------------------------------------------


def synthetic_rows(
    label: str,
    root: Path,
    options: SyntheticOptions,
    normal_dir: Sequence[str] = (),
    categories: Sequence[str] = (),
    name: str = "",
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> list[tuple[str, str, Path, str | None]]:
    """The samples of a ``synthetic`` source: ``(category, label, image, mask)`` per row, ``mask`` ``None`` if normal.

    Every input is checked (normal images, texture folder) before anything is generated.
    """
    groups = normal_image_groups(label, root, normal_dir, categories, name, extensions)
    textures = texture_files(label, options.texture_dir)
    rows: list[tuple[str, str, Path, str | None]] = []
    for category, images in groups.items():
        rows.extend((category, "good", image, None) for image in images)
        for image, mask, _ in synthesise(category, images, options, textures):
            rows.append((category, SYNTHETIC_LABEL, Path(image), mask))
    return rows


def regeneration_plan(specs: Sequence[Any], samples: Any) -> dict[str, tuple[str, PerlinAnomalyGenerator]]:
    """The anomalous training images of ``regenerate`` sources, to be made anew at every load.

    Args:
        specs: the datamodule's source specifications (``synthetic`` options where the format is ``synthetic``).
        samples: the training samples table (columns ``image_path``, ``label``, ``source``).

    Returns:
        Image path -> (the normal image it was made from, the source's anomaly generator).
    """
    plan: dict[str, tuple[str, PerlinAnomalyGenerator]] = {}
    for spec in specs:
        options = getattr(spec, "synthetic", None)
        if options is None or not options.regenerate:
            continue
        rows = samples[(samples["source"] == spec.index) & (samples["label"] == SYNTHETIC_LABEL)]
        generator = anomaly_generator(options, texture_files(spec.label, options.texture_dir))
        wanted = set(rows["image_path"])
        for folder in {Path(image).parent.parent for image in wanted}:
            entries = (read_index(folder) or {"samples": []})["samples"]
            plan.update({image: (source, generator) for image, _, source in entries if image in wanted})
    return plan

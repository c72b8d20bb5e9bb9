"""Tiny synthetic datasets in MVTec AD's layout, for tests, notebooks and benchmarks.

Every category gets its own look (a striped, checkered or smooth texture with category-specific colours and
frequency, plus mild noise). Defects look the same in every category (by default saturated dark or bright irregular
blobs or scratches covering roughly 3-10 % of the image at random places; also coloured stains and small spots, see
:mod:`.toy_defects`), so that a detector trained on some categories can transfer to the others, which is what a
zero-shot protocol needs.

A category is of one of three kinds (:data:`CATEGORY_KINDS`), like the categories of MVTec AD:

* ``texture``: the texture fills the image (carpet, wood); the default;
* ``object``: an elliptical object filled with the texture, at a slightly varying place and angle, on a plain
  background (bottle, hazelnut); defects lie on the object;
* ``grayscale``: a texture in grey levels, saved as a single-channel PNG (grid, screw, zipper).

The layout written by :func:`make_mvtec_like_dataset` is exactly MVTec AD's::

    root/<category>/train/good/000.png
    root/<category>/test/good/000.png
    root/<category>/test/<defect>/000.png
    root/<category>/ground_truth/<defect>/000_mask.png

Images are RGB PNGs, masks single-channel PNGs holding 0 and 255 with the image's size. Everything is a pure function
of ``seed`` (and of the category name, so a category looks the same whichever other categories are generated).

Command line::

    python -m anomalib_anomalyclip.testing.toy_data ROOT [--categories a b] [--image-size 64] [--seed 0]
"""

from __future__ import annotations

import argparse
import shutil
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from anomalib_anomalyclip.testing.toy_defects import (
    ALL_DEFECT_KINDS,
    DEFECT_KINDS,
    add_defect,
    check_defect_kinds,
    stain_color,
)

__all__ = [
    "ALL_DEFECT_KINDS",
    "CATEGORY_KINDS",
    "DEFAULT_CATEGORIES",
    "DEFECT_KINDS",
    "TEXTURE_KINDS",
    "CategoryStyle",
    "add_defect",
    "category_style",
    "main",
    "make_mvtec_like_dataset",
    "render_normal_image",
    "write_image_folder",
]

DEFAULT_CATEGORIES: tuple[str, ...] = ("alpha", "beta", "gamma")
TEXTURE_KINDS: tuple[str, ...] = ("stripes", "checker", "smooth")
CATEGORY_KINDS: tuple[str, ...] = ("texture", "object", "grayscale")
MIN_IMAGE_SIZE = 16

_NOISE_STD = 0.02
_LUMINANCE = np.array([0.299, 0.587, 0.114])  # ITU-R 601, as PIL's "L" conversion


@dataclass(frozen=True)
class CategoryStyle:
    """Look of one synthetic category.

    Attributes:
        name: Category name.
        texture: One of :data:`TEXTURE_KINDS`.
        colors: Two RGB colours in ``[0, 1]`` that the texture blends, shape ``(2, 3)``.
        frequency: Number of texture periods across the image.
        angle: Orientation of the texture in radians.
        kind: One of :data:`CATEGORY_KINDS`.
        background: RGB background colour of an ``object`` category.
    """

    name: str
    texture: str
    colors: tuple[tuple[float, float, float], tuple[float, float, float]]
    frequency: float
    angle: float
    kind: str = "texture"
    background: tuple[float, float, float] = (0.0, 0.0, 0.0)


def _name_code(name: str) -> int:
    """Stable integer code of a string (``hash`` is salted per process)."""
    return zlib.crc32(name.encode("utf-8"))


def _rng(*keys: int) -> np.random.Generator:
    """Random generator that depends only on ``keys``."""
    return np.random.default_rng(np.random.SeedSequence([int(key) for key in keys]))


def category_style(name: str, seed: int = 0, kind: str = "texture") -> CategoryStyle:
    """Derive the look of a category from its name and the dataset seed.

    Args:
        name: Category name.
        seed: Dataset seed.
        kind: One of :data:`CATEGORY_KINDS`; the texture and colours do not depend on it.

    Returns:
        The category's style.
    """
    _check_category_kinds([kind])
    rng = _rng(seed, _name_code(name), 0)
    base = rng.uniform(0.3, 0.7, size=3)
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction) + 1e-8
    other = np.clip(base + direction * rng.uniform(0.2, 0.3), 0.2, 0.8)
    texture = TEXTURE_KINDS[int(rng.integers(len(TEXTURE_KINDS)))]
    frequency = float(rng.uniform(2.0, 6.0))
    angle = float(rng.uniform(0.0, np.pi))
    # Drawn after the texture's numbers, so that a texture category looks as it did before kinds existed.
    background = rng.uniform(0.05, 0.2, size=3) if rng.random() < 0.5 else rng.uniform(0.8, 0.95, size=3)
    return CategoryStyle(
        name=name,
        texture=texture,
        colors=(tuple(float(v) for v in base), tuple(float(v) for v in other)),
        frequency=frequency,
        angle=angle,
        kind=kind,
        background=tuple(float(v) for v in background),
    )


def _texture_field(style: CategoryStyle, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Blend weights in ``[0, 1]`` of shape ``(H, W)`` for one image of ``style``."""
    coords = np.arange(image_size, dtype=np.float64) / image_size
    y, x = np.meshgrid(coords, coords, indexing="ij")
    u = x * np.cos(style.angle) + y * np.sin(style.angle)
    v = -x * np.sin(style.angle) + y * np.cos(style.angle)
    phase_u, phase_v = rng.uniform(0.0, 2.0 * np.pi, size=2)
    wave_u = np.sin(2.0 * np.pi * style.frequency * u + phase_u)
    if style.texture == "stripes":
        return 0.5 + 0.5 * wave_u
    wave_v = np.sin(2.0 * np.pi * style.frequency * v + phase_v)
    if style.texture == "checker":
        return 0.5 + 0.5 * np.tanh(3.0 * wave_u * wave_v)
    # smooth: a low-frequency mixture of two waves
    low = 0.25 * style.frequency
    return 0.5 + 0.25 * (np.sin(2.0 * np.pi * low * u + phase_u) + np.sin(2.0 * np.pi * low * v + phase_v))


def render_normal_image(style: CategoryStyle, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Render a defect-free image of a category.

    Args:
        style: The category's style, see :func:`category_style`.
        image_size: Side of the square image in pixels.
        rng: Random generator (texture phase, object pose, brightness jitter, noise).

    Returns:
        Float image in ``[0, 1]`` of shape ``(image_size, image_size, 3)`` (a ``grayscale`` category's three
        channels are equal).
    """
    return _render(style, image_size, rng)[0]


def _render(style: CategoryStyle, image_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """A normal image and, for an ``object`` category, where its object is."""
    weight = _texture_field(style, image_size, rng)[..., None]
    color_a, color_b = (np.asarray(color) for color in style.colors)
    image = (1.0 - weight) * color_a + weight * color_b
    region = None
    if style.kind == "object":
        region = object_region(image_size, rng)
        image = np.where(region[..., None], image, np.asarray(style.background))
    image = image + rng.uniform(-0.03, 0.03) + rng.normal(0.0, _NOISE_STD, size=image.shape)
    if style.kind == "grayscale":
        image = np.repeat(image @ _LUMINANCE[:, None], 3, axis=-1)
    return np.clip(image, 0.0, 1.0), region


def object_region(image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean ``(H, W)`` mask of an ``object`` category's object: an ellipse near the centre, randomly turned.

    The object covers about 30-45 % of the image.
    """
    coords = np.arange(image_size, dtype=np.float64) + 0.5
    y, x = np.meshgrid(coords, coords, indexing="ij")
    center = image_size * (0.5 + rng.uniform(-0.05, 0.05, size=2))
    axes = image_size * rng.uniform(0.3, 0.38, size=2)
    turn = rng.uniform(0.0, np.pi)
    dx, dy = x - center[0], y - center[1]
    u = dx * np.cos(turn) + dy * np.sin(turn)
    v = -dx * np.sin(turn) + dy * np.cos(turn)
    return (u / axes[0]) ** 2 + (v / axes[1]) ** 2 <= 1.0


def _check_category_kinds(kinds: Sequence[str]) -> None:
    unknown = [kind for kind in kinds if kind not in CATEGORY_KINDS]
    if unknown:
        msg = f"Unknown category kind(s) {unknown}; choose from {list(CATEGORY_KINDS)}."
        raise ValueError(msg)


def _kinds_by_category(categories: Sequence[str], kinds: str | Mapping[str, str]) -> dict[str, str]:
    """The kind of every category: one kind for all, or a mapping (categories it leaves out are textures)."""
    if isinstance(kinds, str):
        chosen = dict.fromkeys(categories, kinds)
    else:
        strangers = sorted(set(kinds) - set(categories))
        if strangers:
            msg = f"`kinds` names categories {strangers} that are not in `categories` {list(categories)}."
            raise ValueError(msg)
        chosen = {category: kinds.get(category, "texture") for category in categories}
    _check_category_kinds(list(chosen.values()))
    return chosen


def _defect_counts(defects: Sequence[str], n_test_defect: int | Mapping[str, int]) -> dict[str, int]:
    """Anomalous test images per defect kind: one count for all, or a mapping (kinds it leaves out: none)."""
    if isinstance(n_test_defect, Mapping):
        strangers = sorted(set(n_test_defect) - set(defects))
        if strangers:
            msg = f"`n_test_defect` names defect kinds {strangers} that are not in `defects` {list(defects)}."
            raise ValueError(msg)
        counts = {kind: int(n_test_defect.get(kind, 0)) for kind in defects}
    else:
        counts = dict.fromkeys(defects, n_test_defect)
    _check_counts(list(counts.values()))
    return counts


def _check_counts(counts: Sequence[int]) -> None:
    if any(count < 0 for count in counts):
        msg = f"Image counts must be non-negative, got {list(counts)}."
        raise ValueError(msg)


def _check_arguments(categories: Sequence[str], image_size: int, counts: Sequence[int], defects: Sequence[str]) -> None:
    if isinstance(categories, str) or not categories:
        msg = f"`categories` must be a non-empty sequence of names, got {categories!r}."
        raise ValueError(msg)
    if len(set(categories)) != len(categories):
        msg = f"`categories` has duplicates: {list(categories)}."
        raise ValueError(msg)
    if image_size < MIN_IMAGE_SIZE:
        msg = f"`image_size` must be at least {MIN_IMAGE_SIZE}, got {image_size}."
        raise ValueError(msg)
    _check_counts(counts)
    if isinstance(defects, str) or not defects:
        msg = f"`defects` must be a non-empty sequence of defect kinds, got {defects!r}."
        raise ValueError(msg)
    check_defect_kinds(defects)


def _prepare_category_dir(category_dir: Path, overwrite: bool) -> None:
    if category_dir.exists() and any(category_dir.iterdir()):
        if not overwrite:
            msg = f"{category_dir} already exists and is not empty; pass overwrite=True (--overwrite) to replace it."
            raise FileExistsError(msg)
        shutil.rmtree(category_dir)


def _save_image(image: np.ndarray, path: Path, grayscale: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.round(image * 255.0).astype(np.uint8)
    if grayscale:
        Image.fromarray(pixels[..., 0], mode="L").save(path)
    else:
        Image.fromarray(pixels, mode="RGB").save(path)


def _save_mask(mask: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(path)


def _write_good_images(folder: Path, style: CategoryStyle, image_size: int, count: int, keys: tuple[int, ...]) -> None:
    grayscale = style.kind == "grayscale"
    for index in range(count):
        image = render_normal_image(style, image_size, _rng(*keys, index))
        _save_image(image, folder / f"{index:03d}.png", grayscale)


def _defective_image(
    style: CategoryStyle, image_size: int, kind: str, rng: np.random.Generator, color: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """A normal image of ``style`` with one defect of ``kind`` (on the object, for an ``object`` category)."""
    image, region = _render(style, image_size, rng)
    return add_defect(image, kind, rng, region=region, color=color)


def _write_category(
    category_dir: Path,
    style: CategoryStyle,
    image_size: int,
    counts: tuple[int, int],
    defects: Mapping[str, int],
    seed: int,
) -> None:
    """Write train/test/ground_truth of one category (``defects``: anomalous images per defect kind)."""
    n_train_good, n_test_good = counts
    code = _name_code(style.name)
    _write_good_images(category_dir / "train" / "good", style, image_size, n_train_good, (seed, code, 1, 0))
    _write_good_images(category_dir / "test" / "good", style, image_size, n_test_good, (seed, code, 2, 0))
    color = stain_color(_rng(seed, code, 3))  # every stain of a category has its colour
    for kind, count in defects.items():
        for index in range(count):
            rng = _rng(seed, code, 2, 1 + ALL_DEFECT_KINDS.index(kind), index)
            image, mask = _defective_image(style, image_size, kind, rng, color)
            _save_image(image, category_dir / "test" / kind / f"{index:03d}.png", style.kind == "grayscale")
            _save_mask(mask, category_dir / "ground_truth" / kind / f"{index:03d}_mask.png")


def write_image_folder(
    folder: str | Path, count: int, image_size: int = 64, category: str = "wood", seed: int = 0, defect_every: int = 5
) -> list[Path]:
    """Write ``count`` images of one category into ``folder`` (``image_0000.png``, ...): a folder to predict on.

    Every ``defect_every``-th image carries a blob defect (0: none), so that a pool holds a few anomalous images.

    Returns:
        The image files, sorted.
    """
    style = category_style(category, seed)
    paths = []
    for index in range(count):
        rng = _rng(seed, _name_code(category), index)
        image = render_normal_image(style, image_size, rng)
        if defect_every and index % defect_every == defect_every - 1:
            image = add_defect(image, "blob", rng)[0]
        path = Path(folder) / f"image_{index:04d}.png"
        _save_image(image, path, style.kind == "grayscale")
        paths.append(path)
    return paths


def make_mvtec_like_dataset(
    root: str | Path,
    categories: Sequence[str] = DEFAULT_CATEGORIES,
    image_size: int = 64,
    n_train_good: int = 4,
    n_test_good: int = 4,
    n_test_defect: int | Mapping[str, int] = 4,
    defects: Sequence[str] = ("blob",),
    seed: int = 0,
    overwrite: bool = False,
    kinds: str | Mapping[str, str] = "texture",
) -> Path:
    """Write a small synthetic dataset in MVTec AD's exact layout.

    Args:
        root: Dataset root; category folders are created directly below it.
        categories: Category names (folder names).
        image_size: Side of the square images in pixels (at least 16).
        n_train_good: Normal training images per category (``train/good``).
        n_test_good: Normal test images per category (``test/good``).
        n_test_defect: Anomalous test images per category and defect kind (``test/<defect>``), each with a mask
            ``ground_truth/<defect>/<stem>_mask.png``; or a mapping from defect kinds to counts (kinds of
            ``defects`` it leaves out get none), e.g. a split where one kind is in most anomalous images.
        defects: Defect kinds to generate, from :data:`ALL_DEFECT_KINDS` (see :mod:`.toy_defects`); each is also
            the defect folder name.
        seed: Seed; the output is a pure function of the arguments.
        overwrite: Replace category folders that already exist. Without it an existing non-empty category folder
            raises :class:`FileExistsError` (nothing else in ``root`` is touched either way).
        kinds: Kind of every category (see :data:`CATEGORY_KINDS`), or a mapping from category names to kinds
            (categories it leaves out are textures). A ``grayscale`` category's images are single-channel PNGs.

    Returns:
        ``root`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: On invalid arguments (unknown defect or category kind, duplicate categories, tiny images...).
        FileExistsError: If a category folder exists, is not empty and ``overwrite`` is false.

    Example:
        >>> root = make_mvtec_like_dataset("/tmp/synthetic", categories=("alpha", "beta"), image_size=32)
        >>> sorted(p.name for p in root.iterdir())
        ['alpha', 'beta']
    """
    categories = tuple(categories)
    defects = tuple(defects)
    _check_arguments(categories, image_size, (n_train_good, n_test_good), defects)
    per_defect = _defect_counts(defects, n_test_defect)
    kind_of = _kinds_by_category(categories, kinds)
    root = Path(root)
    for category in categories:
        _prepare_category_dir(root / category, overwrite)
    for category in categories:
        style = category_style(category, seed, kind_of[category])
        _write_category(root / category, style, image_size, (n_train_good, n_test_good), per_defect, seed)
    return root


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m anomalib_anomalyclip.testing.toy_data",
        description="Write a small synthetic dataset in MVTec AD's layout.",
    )
    parser.add_argument("root", type=Path, help="dataset root (category folders are created below it)")
    parser.add_argument("--categories", nargs="+", default=list(DEFAULT_CATEGORIES))
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--n-train-good", type=int, default=4)
    parser.add_argument("--n-test-good", type=int, default=4)
    parser.add_argument("--n-test-defect", type=int, default=4)
    parser.add_argument("--defects", nargs="+", default=["blob"], choices=ALL_DEFECT_KINDS)
    parser.add_argument(
        "--kinds", nargs="+", default=["texture"], choices=CATEGORY_KINDS, help="one kind for all, or one per category"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace existing category folders")
    return parser.parse_args(argv)


def _kinds_argument(categories: Sequence[str], kinds: Sequence[str]) -> str | dict[str, str]:
    if len(kinds) == 1:
        return kinds[0]
    if len(kinds) != len(categories):
        msg = f"--kinds takes one kind or one per category ({len(categories)}), got {len(kinds)}."
        raise SystemExit(msg)
    return dict(zip(categories, kinds, strict=True))


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The exit status (0 on success).
    """
    args = _parse_args(argv)
    root = make_mvtec_like_dataset(
        args.root,
        categories=args.categories,
        image_size=args.image_size,
        n_train_good=args.n_train_good,
        n_test_good=args.n_test_good,
        n_test_defect=args.n_test_defect,
        defects=args.defects,
        seed=args.seed,
        overwrite=args.overwrite,
        kinds=_kinds_argument(args.categories, args.kinds),
    )
    n_images = sum(1 for _ in root.glob("*/t*/*/*.png"))
    print(f"Wrote {n_images} images in {len(args.categories)} categories to {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

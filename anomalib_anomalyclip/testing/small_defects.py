"""High-resolution images with small defects (a few pixels across), for tiled inference tests and studies.

The categories look as those of :mod:`.toy_data` (texture, object on a background, grayscale; the same styles and
textures, rendered in float32 to keep 1536 px images fast), but
the images are large (1536 px by default) and each defective image carries a few small defects: dark or bright
spots and short scratches of 4 to 16 px, about what a 1500 px board of VisA shows. Squeezed to a 518 px (or a tiny
CLIP's 112 px) input, such a defect covers a fraction of one patch; tiles at the image's own size see it whole.

:func:`small_defect_sample` draws one image (and mask) in memory; :func:`make_small_defect_dataset` writes
categories in MVTec AD's layout (``train/good``, ``test/good``, ``test/small``, ``ground_truth/small``). Everything
is a pure function of the seed and the category's name.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from anomalib_anomalyclip.testing.toy_data import (
    CategoryStyle,
    _name_code,
    _rng,
    _save_image,
    _save_mask,
    category_style,
)

__all__ = [
    "DEFECT_FOLDER",
    "SMALL_DEFECT_KINDS",
    "SPLITS",
    "make_small_defect_dataset",
    "small_defect_sample",
    "small_defect_split",
]

SMALL_DEFECT_KINDS = {"small_texture": "texture", "small_object": "object", "small_gray": "grayscale"}
DEFECT_FOLDER = "small"
_NOISE_STD = 0.02
_PLACEMENT_TRIES = 50
_LUMINANCE = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _wave(frequency: float, direction: tuple[float, float], phase: float, size: int) -> np.ndarray:
    """``sin(2 pi f (x dx + y dy) + phase)`` on a size x size grid of [0, 1) coordinates, from two 1-D waves."""
    coords = np.arange(size, dtype=np.float32) / size
    along_x = 2 * np.pi * frequency * direction[0] * coords + phase
    along_y = 2 * np.pi * frequency * direction[1] * coords
    return np.sin(along_y)[:, None] * np.cos(along_x)[None, :] + np.cos(along_y)[:, None] * np.sin(along_x)[None, :]


def _texture(style: CategoryStyle, size: int, rng: np.random.Generator) -> np.ndarray:
    """Blend weights (H, W) in [0, 1] of a texture of ``style`` (the textures of :mod:`.toy_data`, in float32)."""
    across = (float(np.cos(style.angle)), float(np.sin(style.angle)))
    down = (-across[1], across[0])
    phase_u, phase_v = (float(phase) for phase in rng.uniform(0.0, 2.0 * np.pi, size=2))
    if style.texture == "stripes":
        return 0.5 + 0.5 * _wave(style.frequency, across, phase_u, size)
    if style.texture == "checker":
        product = _wave(style.frequency, across, phase_u, size) * _wave(style.frequency, down, phase_v, size)
        return 0.5 + 0.5 * np.tanh(3.0 * product)
    low = 0.25 * style.frequency
    return 0.5 + 0.25 * (_wave(low, across, phase_u, size) + _wave(low, down, phase_v, size))


def _object(size: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean (H, W) ellipse near the centre, turned at random, covering about a third of the image."""
    centre = size * (0.5 + rng.uniform(-0.05, 0.05, size=2))
    axes = size * rng.uniform(0.3, 0.38, size=2)
    turn = rng.uniform(0.0, np.pi)
    dx = np.arange(size, dtype=np.float32) + 0.5 - centre[0]
    dy = np.arange(size, dtype=np.float32) + 0.5 - centre[1]
    c, s = np.cos(turn), np.sin(turn)
    a, b = 1 / axes[0] ** 2, 1 / axes[1] ** 2
    # ((dx c + dy s) / a0)^2 + ((-dx s + dy c) / a1)^2 as a quadratic form in dx and dy
    xx, yy, xy = a * c * c + b * s * s, a * s * s + b * c * c, 2 * (a - b) * c * s
    return (xx * dx**2)[None, :] + (yy * dy**2)[:, None] + xy * dy[:, None] * dx[None, :] <= 1.0


def _render(style: CategoryStyle, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """A normal image (H, W, 3) of ``style`` and, for an object category, where its object is.

    Computed channel by channel (the returned array is a view of a (3, H, W) one); a grayscale category is blended in
    grey levels (its colours' luminance) and gets grey noise; the noise is uniform with the toy datasets' deviation.
    """
    weight = _texture(style, size, rng)
    colors = np.asarray(style.colors, dtype=np.float32) + np.float32(rng.uniform(-0.03, 0.03))
    background = np.asarray(style.background, dtype=np.float32)
    if style.kind == "grayscale":
        colors, background = colors @ _LUMINANCE[:, None], background @ _LUMINANCE[:, None]
    planes = colors[0][:, None, None] + (colors[1] - colors[0])[:, None, None] * weight
    region = None
    if style.kind == "object":
        region = _object(size, rng)
        planes[:, ~region] = background[:, None]
    noise = rng.random(planes.shape, dtype=np.float32)
    planes += (noise - 0.5) * np.float32(_NOISE_STD * np.sqrt(12.0))
    np.clip(planes, 0.0, 1.0, out=planes)
    if style.kind == "grayscale":
        planes = np.repeat(planes, 3, axis=0)
    return np.moveaxis(planes, 0, -1), region


def _defect_mask(image_size: int, size: float, rng: np.random.Generator, region: np.ndarray | None) -> np.ndarray:
    """Boolean mask of one spot (a disc of diameter ``size``) or scratch (``size`` long, 2-3 px wide)."""
    canvas = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(canvas)
    margin = size + 2
    for _ in range(_PLACEMENT_TRIES):
        centre = rng.uniform(margin, image_size - margin, size=2)
        if region is None or region[int(centre[1]), int(centre[0])]:
            break
    if rng.random() < 0.5:
        radius = size / 2
        draw.ellipse([centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius], fill=255)
    else:
        angle = rng.uniform(0.0, np.pi)
        offset = size / 2 * np.array([np.cos(angle), np.sin(angle)])
        start, end = centre - offset, centre + offset
        draw.line([tuple(start), tuple(end)], fill=255, width=int(rng.integers(2, 4)))
    return np.asarray(canvas) > 0


def small_defect_sample(
    kind: str,
    category: str,
    image_size: int,
    rng: np.random.Generator,
    defects: int = 0,
    defect_size: tuple[float, float] = (4.0, 16.0),
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """One image of ``category`` with ``defects`` small defects.

    Args:
        kind: ``texture``, ``object`` or ``grayscale`` (see :mod:`.toy_data`).
        category: the category's name (its style).
        image_size: side of the square image.
        rng: random generator of this image.
        defects: number of defects (0: a normal image).
        defect_size: range of the defects' size in pixels (a spot's diameter, a scratch's length).
        seed: the dataset seed (the category's style).

    Returns:
        The image (H, W, 3) in [0, 1] and its boolean mask (H, W).
    """
    style = category_style(category, seed, kind)
    image, region = _render(style, image_size, rng)
    mask = np.zeros((image_size, image_size), dtype=bool)
    for _ in range(defects):
        spot = _defect_mask(image_size, rng.uniform(*defect_size), rng, region)
        level = rng.uniform(0.02, 0.1) if rng.random() < 0.5 else rng.uniform(0.9, 0.98)
        paint = np.clip(level + rng.normal(0.0, _NOISE_STD, size=(int(spot.sum()), 3)), 0.0, 1.0)
        image[spot] = paint.mean(axis=1, keepdims=True) if kind == "grayscale" else paint
        mask |= spot
    return image, mask


SPLITS = ("train/good", "test/good", f"test/{DEFECT_FOLDER}")


def small_defect_split(
    category: str,
    kind: str,
    split: str,
    count: int,
    image_size: int = 1536,
    defects_per_image: int = 3,
    defect_size: tuple[float, float] = (4.0, 16.0),
    seed: int = 0,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The images and masks of one split of a category (one of :data:`SPLITS`), in memory.

    Args:
        category: the category's name.
        kind: ``texture``, ``object`` or ``grayscale``.
        split: ``train/good``, ``test/good`` (normal images) or ``test/small`` (defective ones).
        count: number of images.
        image_size: side of the square images.
        defects_per_image: defects of each image of ``test/small``.
        defect_size: range of the defects' size in pixels.
        seed: dataset seed.
    """
    defects = defects_per_image if split == SPLITS[2] else 0
    keys = (seed, _name_code(category), SPLITS.index(split))
    return [
        small_defect_sample(kind, category, image_size, _rng(*keys, index), defects, defect_size, seed)
        for index in range(count)
    ]


def make_small_defect_dataset(
    root: str | Path,
    kinds: Mapping[str, str] = SMALL_DEFECT_KINDS,
    image_size: int = 1536,
    n_train_good: int = 4,
    n_test_good: int = 4,
    n_test_defect: int = 4,
    defects_per_image: int = 3,
    defect_size: tuple[float, float] = (4.0, 16.0),
    seed: int = 0,
) -> Path:
    """Write categories (name -> kind) of large images with small defects in MVTec AD's layout.

    Defective images go to ``test/small`` with masks in ``ground_truth/small``; the images are those of
    :func:`small_defect_split`. Existing files are overwritten.

    Returns:
        ``root`` as a :class:`~pathlib.Path`.
    """
    root = Path(root)
    for category, kind in kinds.items():
        for split, count in zip(SPLITS, (n_train_good, n_test_good, n_test_defect), strict=True):
            samples = small_defect_split(category, kind, split, count, image_size, defects_per_image, defect_size, seed)
            for index, (image, mask) in enumerate(samples):
                _save_image(image, root / category / split / f"{index:03d}.png", kind == "grayscale")
                if split == SPLITS[2]:
                    _save_mask(mask, root / category / "ground_truth" / DEFECT_FOLDER / f"{index:03d}_mask.png")
    return root

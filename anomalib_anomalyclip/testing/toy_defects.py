"""Defects painted onto the toy images of :mod:`.toy_data`: their shapes, colours and masks.

Kinds (:data:`ALL_DEFECT_KINDS`), each covering about 3-10 % of the image at a random place:

* ``blob``: an irregular star-shaped region, saturated dark or bright (chosen at random);
* ``scratch``: a thick zig-zag line, saturated dark or bright;
* ``stain``: an irregular region in a colour (a saturated hue; on a grey image, a dark or light grey), painted
  at 75 % opacity so that the texture shows through; :func:`~.toy_data.make_mvtec_like_dataset` gives every stain of
  a category the same colour (one contamination of one product), so that a split whose anomalous images mostly hold
  stains repeats one defect, the known weak case of scoring images against each other;
* ``spots``: three to five small discs at random places, dark or bright.

:data:`DEFECT_KINDS` (``blob`` and ``scratch``) are the saturated kinds, the generator's default choice.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["ALL_DEFECT_KINDS", "DEFECT_KINDS", "add_defect", "check_defect_kinds", "stain_color"]

DEFECT_KINDS: tuple[str, ...] = ("blob", "scratch")
ALL_DEFECT_KINDS: tuple[str, ...] = (*DEFECT_KINDS, "stain", "spots")

_COVERAGE_RANGE = (0.03, 0.10)
_NOISE_STD = 0.02
_MIN_DEFECT_ON_OBJECT = 0.6  # share of a defect that must lie on the object
_STAIN_OPACITY = 0.75
_MIN_SPOT_RADIUS = 1.5


def _blob_polygon(image_size: int, area: float, rng: np.random.Generator) -> list[tuple[float, float]]:
    """Irregular star-shaped polygon of about ``area`` pixels that fits inside the image."""
    harmonics = np.arange(2, 5)
    amplitudes = rng.uniform(0.0, 0.25, size=harmonics.size)
    phases = rng.uniform(0.0, 2.0 * np.pi, size=harmonics.size)
    # Area of r(t) = r0 * (1 + sum a_k cos(k t + p_k)) is pi * r0^2 * (1 + sum a_k^2 / 2).
    radius = np.sqrt(area / (np.pi * (1.0 + 0.5 * np.sum(amplitudes**2))))
    max_radius = radius * (1.0 + amplitudes.sum())
    low, high = max_radius + 1.0, image_size - 1.0 - max_radius
    center = rng.uniform(low, high, size=2) if high > low else np.full(2, image_size / 2.0)
    angles = np.linspace(0.0, 2.0 * np.pi, 48, endpoint=False)
    radii = radius * (1.0 + np.sum(amplitudes[:, None] * np.cos(harmonics[:, None] * angles + phases[:, None]), 0))
    xs = center[0] + radii * np.cos(angles)
    ys = center[1] + radii * np.sin(angles)
    return list(zip(xs.tolist(), ys.tolist(), strict=True))


def _scratch_polyline(image_size: int, area: float, rng: np.random.Generator) -> tuple[list[tuple[float, float]], int]:
    """Zig-zag polyline of about ``area`` pixels (length x width) that fits inside the image."""
    width = max(2, round(image_size / 12))
    n_segments = 4
    length = area / width / n_segments
    heading = rng.uniform(0.0, 2.0 * np.pi)
    points = [np.zeros(2)]
    for _ in range(n_segments):
        heading += rng.uniform(-1.2, 1.2)
        points.append(points[-1] + length * np.array([np.cos(heading), np.sin(heading)]))
    polyline = np.stack(points)
    polyline -= polyline.min(axis=0)
    margin = width / 2.0 + 1.0
    room = image_size - 2.0 * margin
    extent = polyline.max(axis=0)
    scale = min(1.0, float(room / max(extent.max(), 1e-6)))
    if scale < 1.0:  # too long to fit: shorten it and thicken it to keep the area
        polyline *= scale
        width = max(2, round(width / scale))
        extent = polyline.max(axis=0)
    offset = margin + rng.uniform(0.0, 1.0, size=2) * np.maximum(room - extent, 0.0)
    polyline += offset
    return [(float(x), float(y)) for x, y in polyline], width


def _spot_discs(image_size: int, area: float, rng: np.random.Generator) -> list[tuple[float, float, float, float]]:
    """Bounding boxes of three to five discs (fewer on small images) of about ``area`` pixels, inside the image."""
    count = int(rng.integers(3, 6))
    radius = float(np.sqrt(area / (count * np.pi)))
    if radius < _MIN_SPOT_RADIUS:  # a small image: fewer spots, each of the smallest size
        count, radius = max(1, int(area / (np.pi * _MIN_SPOT_RADIUS**2))), _MIN_SPOT_RADIUS
    centres = rng.uniform(radius + 1.0, max(radius + 1.0, image_size - 1.0 - radius), size=(count, 2))
    return [(x - radius, y - radius, x + radius, y + radius) for x, y in centres.tolist()]


def _defect_mask(kind: str, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean ``(H, W)`` mask of one defect of ``kind``."""
    area = rng.uniform(*_COVERAGE_RANGE) * image_size**2
    canvas = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(canvas)
    if kind in ("blob", "stain"):
        draw.polygon(_blob_polygon(image_size, area, rng), fill=255)
    elif kind == "spots":
        for box in _spot_discs(image_size, area, rng):
            draw.ellipse(box, fill=255)
    else:
        points, width = _scratch_polyline(image_size, area, rng)
        draw.line(points, fill=255, width=width, joint="curve")
    return np.asarray(canvas) > 0


def stain_color(rng: np.random.Generator) -> tuple[float, float, float]:
    """A saturated RGB colour in ``[0, 1]`` (random hue, saturation 0.75-1, value 0.75-0.95)."""
    hue, saturation, value = rng.uniform(0.0, 1.0), rng.uniform(0.75, 1.0), rng.uniform(0.75, 0.95)
    red, green, blue = colorsys.hsv_to_rgb(hue, saturation, value)
    return float(red), float(green), float(blue)


def add_defect(
    image: np.ndarray,
    kind: str,
    rng: np.random.Generator,
    region: np.ndarray | None = None,
    color: tuple[float, float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect onto an image.

    Args:
        image: Float image in ``[0, 1]`` of shape ``(H, W, 3)`` with ``H == W``.
        kind: One of :data:`ALL_DEFECT_KINDS` (see the module's documentation).
        rng: Random generator.
        region: Boolean ``(H, W)`` mask the defect must lie in (an object); it is placed so that most of it does,
            and cut to it.
        color: RGB colour of a ``stain`` in ``[0, 1]``; ``None`` draws one (:func:`stain_color`). Other kinds
            ignore it.

    Returns:
        The defective image (a new array) and its boolean ``(H, W)`` mask.

    Raises:
        ValueError: If ``kind`` is unknown.
    """
    check_defect_kinds([kind])
    mask = _defect_mask(kind, image.shape[0], rng)
    if region is not None:
        for _ in range(20):  # a defect mostly off the object is drawn again
            if (mask & region).sum() >= _MIN_DEFECT_ON_OBJECT * mask.sum():
                break
            mask = _defect_mask(kind, image.shape[0], rng)
        mask &= region
    defective = image.copy()
    if kind == "stain":
        paint = _stain_paint(image, mask, color if color is not None else stain_color(rng))
    else:
        level = rng.uniform(0.02, 0.08) if rng.random() < 0.5 else rng.uniform(0.92, 0.98)
        paint = level
    defective[mask] = np.clip(paint + rng.normal(0.0, _NOISE_STD, size=(int(mask.sum()), 3)), 0.0, 1.0)
    return defective, mask


def _stain_paint(image: np.ndarray, mask: np.ndarray, color: tuple[float, float, float]) -> np.ndarray:
    """The stained pixels before noise: ``color`` (a grey for a grey image) over the image at 75 % opacity."""
    paint = np.asarray(color, dtype=np.float64)
    if np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 1], image[..., 2]):
        paint = np.full(3, 0.12 if paint @ np.array([0.299, 0.587, 0.114]) < 0.5 else 0.88)
    return _STAIN_OPACITY * paint + (1.0 - _STAIN_OPACITY) * image[mask]


def check_defect_kinds(defects: Sequence[str]) -> None:
    """Raise ``ValueError`` naming the valid kinds when ``defects`` holds an unknown one."""
    unknown = [kind for kind in defects if kind not in ALL_DEFECT_KINDS]
    if unknown:
        msg = f"Unknown defect kind(s) {unknown}; choose from {list(ALL_DEFECT_KINDS)}."
        raise ValueError(msg)

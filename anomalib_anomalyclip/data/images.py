"""Reading images and masks, and checking image files before a run.

This is the one place where the package reads image files. anomalib's ``read_image`` does
``Image.open(path).convert("RGB")``, which is right for 8-bit images but silently wrong for others: a 16-bit
grayscale PNG is clipped to white, and transparency is dropped with whatever colour the transparent pixels happen to
hold. An unreadable or truncated file fails deep inside PIL, for a truncated file without naming it.
:func:`read_image` converts every image deliberately:

* 8-bit RGB, grayscale (``L``, ``1``), palette, CMYK and YCbCr images: converted to RGB by PIL, as anomalib does;
* 16-bit grayscale (``I;16`` and its byte orders): scaled from [0, 65535] to [0, 1] and copied to the three channels;
  32-bit integer images (``I``) likewise when their values fit in 16 bits (otherwise an error);
* 32-bit float images (``F``): used as they are when their values lie in [0, 1] (otherwise an error: the scale is
  unknown);
* images with transparency (``RGBA``, ``LA``, ``PA``, palette or colour-key transparency): composited over black,
  that is colour x alpha. Opaque pixels keep their colour; for fully opaque images this equals dropping alpha;
* 16-bit-per-channel RGB PNGs: PIL reads them as 8-bit RGB (the high byte), which is correct.

Any size and aspect ratio is read as it is; the model's pre-processor resizes to its square input.

A file that cannot be used raises :class:`BadImageError`, whose message names the file, what is wrong and the fix.
:func:`check_files` looks at many files at once and lists every problem in one error, so that a run stops
before it starts instead of at the first bad file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import tv_tensors
from torchvision.tv_tensors import Mask

from anomalib_anomalyclip.errors import BadImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "BadImageError",
    "anomalib_reader_problem",
    "check_files",
    "describe_problems",
    "image_problem",
    "image_size",
    "list_image_files",
    "normalise_extensions",
    "read_image",
    "read_mask",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
"""File extensions (lower case) taken for images when listing folders."""

_MAX_16_BIT = 65535.0
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_MAX_LISTED_PROBLEMS = 20
_FIX_UNREADABLE = "Copy or export the file again (PNG or JPEG), or remove it."

PathLike = str | os.PathLike
T = TypeVar("T")


def read_image(path: PathLike) -> tv_tensors.Image:
    """Read an image file as an RGB float image in [0, 1], converting deliberately (see the module docstring).

    Args:
        path: Image file.

    Returns:
        Float32 tensor of shape ``(3, H, W)`` with values in [0, 1].

    Raises:
        BadImageError: If the file does not exist, is not an image, is truncated or has values of unknown scale.
    """
    path = Path(path)
    rgb = _rgb_array(_open(path, decode=True), path)
    return tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1))


def read_mask(path: PathLike) -> Mask:
    """Read a mask file: every non-zero pixel is anomalous, whatever the bit depth.

    Args:
        path: Mask file.

    Returns:
        ``uint8`` mask of shape ``(H, W)`` with values 0 and 1.

    Raises:
        BadImageError: If the file does not exist, is not an image or is truncated.
    """
    path = Path(path)
    image = _open(path, decode=True)
    if image.mode not in _SIXTEEN_BIT_MODES | {"I", "F", "1", "L"}:
        image = image.convert("L")
    return Mask(torch.from_numpy(np.asarray(image) != 0).to(torch.uint8))


def image_size(path: PathLike) -> tuple[int, int]:
    """Width and height of an image file, from its header (the pixels are not decoded).

    Raises:
        BadImageError: If the file does not exist or is not an image.
    """
    return _open(Path(path), decode=False).size


def image_problem(path: PathLike, decode: bool = True) -> str | None:
    """What keeps :func:`read_image` from reading a file, or ``None``.

    Args:
        path: Image file.
        decode: Decode the pixels too (finds truncated files and values of unknown scale; slower than the header
            check, which finds missing files and files that are not images).

    Returns:
        One line naming the file, the problem and the fix; ``None`` if the file is fine.
    """
    try:
        if decode:
            read_image(path)
        else:
            image_size(path)
    except BadImageError as error:
        return str(error)
    return None


READ_WRONGLY = "anomalib's image reader would"
"""How :func:`anomalib_reader_problem` begins the problems of files that anomalib reads without an error, wrongly."""


def anomalib_reader_problem(path: PathLike, decode: bool = True) -> str | None:
    """What goes wrong when anomalib's own ``read_image`` (``Image.open(path).convert("RGB")``) reads a file.

    Finds what :func:`image_problem` finds, and images that anomalib's reader converts wrongly without an error:
    16-bit, 32-bit and float grayscale images (clipped, mostly to white) and images with transparent pixels
    (transparency dropped instead of composited). Only files with an alpha channel are decoded for the latter when
    ``decode`` is false.

    Args:
        path: Image file.
        decode: Decode every file (finds truncated files too).

    Returns:
        One line naming the file and the problem; ``None`` if anomalib reads the file correctly.
    """
    path = Path(path)
    try:
        image = _open(path, decode=decode)
        if image.mode in _SIXTEEN_BIT_MODES | {"I", "F"}:
            return f"{path}: {_mode_name(image.mode)}; {READ_WRONGLY} clip its values (mostly to white)."
        if image.has_transparency_data and _has_transparent_pixels(image if decode else _open(path, decode=True)):
            return f"{path}: has transparent pixels; {READ_WRONGLY} drop the transparency."
    except BadImageError as error:
        return str(error)
    return None


def check_files(
    items: Iterable[T],
    problem: Callable[[T], str | None] = image_problem,
    what: str = "image files",
    fix: str | Callable[[Sequence[str]], str] = "",
) -> None:
    """Look at every file (or pair of files) and raise one error that lists all problems.

    Args:
        items: Files to check, or whatever ``problem`` takes (e.g. image and mask paths).
        problem: Returns one line describing an item's problem, or ``None`` (e.g. :func:`image_problem`,
            :func:`anomalib_reader_problem`).
        what: What the items are, for the message (e.g. ``"images in /data/parts"``).
        fix: Advice printed after the list, or a function of the problems that returns it (advice that fits them).

    Raises:
        BadImageError: If any item has a problem.
    """
    items = list(items)
    problems = [line for line in map(problem, items) if line is not None]
    if problems:
        advice = fix(problems) if callable(fix) else fix
        raise BadImageError(describe_problems(problems, len(items), what, advice))


def describe_problems(problems: Sequence[str], total: int, what: str, fix: str = "") -> str:
    """One message listing problems (at most 20, then a count), followed by the fix."""
    listed = [f"  - {line}" for line in problems[:_MAX_LISTED_PROBLEMS]]
    if len(problems) > _MAX_LISTED_PROBLEMS:
        listed.append(f"  ... and {len(problems) - _MAX_LISTED_PROBLEMS} more.")
    advice = f"\n{fix}" if fix else ""
    return f"{len(problems)} of {total} {what} cannot be used:\n" + "\n".join(listed) + advice


def normalise_extensions(extensions: str | Sequence[str] | None) -> tuple[str, ...]:
    """Lower-case extensions with a leading dot (``"PNG"`` -> ``".png"``); :data:`IMAGE_EXTENSIONS` for ``None``."""
    if extensions is None:
        return IMAGE_EXTENSIONS
    if isinstance(extensions, str):
        extensions = (extensions,)
    return tuple(ext.lower() if ext.startswith(".") else f".{ext.lower()}" for ext in extensions)


def list_image_files(path: PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """The image files of a folder and its sub-folders (sorted, hidden files skipped), or one image file.

    Args:
        path: Folder, or a single image file.
        extensions: Lower-case extensions with a leading dot.

    Returns:
        The image files.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        BadImageError: If ``path`` is a folder without any image file, or a file without an image extension.
    """
    path = Path(path)
    if not path.exists():
        msg = f"{path} does not exist. Give a folder of images or one image file (relative to {Path.cwd()})."
        raise FileNotFoundError(msg)
    if path.is_file():
        if path.suffix.lower() not in extensions:
            raise BadImageError(f"{path} is not an image file; expected one of the extensions {list(extensions)}.")
        return [path]
    files = sorted(file for file in path.rglob("*") if file.is_file() and not _is_hidden(file, path))
    images = [file for file in files if file.suffix.lower() in extensions]
    if not images:
        raise BadImageError(_no_images_message(path, files, extensions))
    return images


def _no_images_message(folder: Path, files: Sequence[Path], extensions: Sequence[str]) -> str:
    others = ""
    if files:
        suffixes = sorted({file.suffix.lower() or "(none)" for file in files})
        others = f" It holds {len(files)} other file(s), with extensions {suffixes[:10]}."
    return (
        f"No images found in {folder} or its sub-folders (extensions {list(extensions)}).{others} "
        "Give a folder that holds images, or convert the images to PNG or JPEG."
    )


def _is_hidden(file: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in file.relative_to(root).parts)


def _open(path: Path, decode: bool) -> Image.Image:
    """Open an image (and decode its pixels), turning every failure into a :class:`BadImageError`."""
    if not path.is_file():
        what = "is a folder, not an image file" if path.is_dir() else "does not exist"
        raise BadImageError(f"{path}: {what}. Check the path.")
    try:
        with Image.open(path) as image:
            if decode:
                image.load()
            return image
    except Exception as error:  # PIL raises many types for broken files (OSError, SyntaxError, struct.error...)
        raise BadImageError(f"{path}: {_read_failure(error)}. {_FIX_UNREADABLE}") from error


def _read_failure(error: Exception) -> str:
    """Short description of why PIL could not read a file."""
    if isinstance(error, UnidentifiedImageError):
        return "not an image file that Pillow can read"
    if isinstance(error, EOFError) or "truncated" in str(error).lower():
        return f"the file is truncated, an incomplete copy or download ({error})"
    return f"cannot be decoded ({type(error).__name__}: {error})"


def _mode_name(mode: str) -> str:
    names = {"I": "32-bit integer grayscale (mode I)", "F": "32-bit float grayscale (mode F)"}
    return names.get(mode, f"16-bit grayscale (mode {mode})")


def _has_transparent_pixels(image: Image.Image) -> bool:
    low, _ = image.convert("RGBA").getchannel("A").getextrema()
    return low < 255


def _rgb_array(image: Image.Image, path: Path) -> np.ndarray:
    """``(H, W, 3)`` float32 array in [0, 1] of a decoded image."""
    if image.mode in _SIXTEEN_BIT_MODES | {"I", "F"}:
        gray = _scaled_gray(image, path)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.has_transparency_data:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
        return rgba[..., :3] * rgba[..., 3:]
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def _scaled_gray(image: Image.Image, path: Path) -> np.ndarray:
    """A high-bit-depth grayscale image scaled to [0, 1], or an error when its scale is unknown."""
    values = np.asarray(image).astype(np.float32)
    if image.mode == "F":
        if values.size and (np.nanmin(values) < 0.0 or np.nanmax(values) > 1.0 or np.isnan(values).any()):
            msg = (
                f"{path}: 32-bit float grayscale image with values outside [0, 1], so its scale is unknown. "
                "Save it as an 8- or 16-bit PNG."
            )
            raise BadImageError(msg)
        return values
    if image.mode == "I" and values.size and (values.min() < 0 or values.max() > _MAX_16_BIT):
        msg = (
            f"{path}: 32-bit integer grayscale image with values outside [0, 65535], so its scale is unknown. "
            "Save it as an 8- or 16-bit PNG."
        )
        raise BadImageError(msg)
    return values / _MAX_16_BIT

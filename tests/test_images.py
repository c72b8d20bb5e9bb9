"""Reading images and masks: conversions, clear errors, folder listing and up-front checks."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomalib_anomalyclip.data.images import (
    BadImageError,
    anomalib_reader_problem,
    check_files,
    image_problem,
    image_size,
    list_image_files,
    read_image,
    read_mask,
)


def _rgb(height: int = 12, width: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _save(array: np.ndarray, path: Path, **kwargs: object) -> Path:
    Image.fromarray(array).save(path, **kwargs)
    return path


def _truncated_copy(source: Path, destination: Path) -> Path:
    data = source.read_bytes()
    destination.write_bytes(data[: len(data) * 2 // 3])
    return destination


def test_rgb_and_grayscale_read_as_three_channels_in_unit_range(tmp_path: Path) -> None:
    rgb = _rgb()
    image = read_image(_save(rgb, tmp_path / "rgb.png"))
    assert image.dtype == torch.float32 and image.shape == (3, 12, 16)
    assert torch.allclose(image, torch.from_numpy(rgb).permute(2, 0, 1) / 255.0)
    gray = read_image(_save(rgb[..., 0], tmp_path / "gray.png"))
    assert gray.shape == (3, 12, 16)
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert torch.allclose(gray[0], torch.from_numpy(rgb[..., 0]) / 255.0)


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    gray8 = _rgb()[..., 0]
    path = _save(gray8.astype(np.uint16) * 257, tmp_path / "gray16.png")  # 257 maps 255 to 65535
    with Image.open(path) as raw:
        assert raw.mode == "I;16"
        assert (np.asarray(raw.convert("RGB")) == 255).mean() > 0.9  # what anomalib's reader gives: white
    expected = read_image(_save(gray8, tmp_path / "gray8.png"))
    assert torch.allclose(read_image(path), expected, atol=1e-6)


def test_32_bit_integer_and_float_images(tmp_path: Path) -> None:
    values = np.linspace(0, 65535, 12 * 16).round().reshape(12, 16)
    integer = read_image(_save(values.astype(np.int32), tmp_path / "int32.tif"))
    assert torch.allclose(integer[0], torch.from_numpy(values / 65535.0).float(), atol=1e-6)
    floats = read_image(_save((values / 65535.0).astype(np.float32), tmp_path / "float.tif"))
    assert torch.allclose(floats, integer, atol=1e-6)
    with pytest.raises(BadImageError, match=r"int_large\.tif: 32-bit integer .* outside \[0, 65535\]"):
        read_image(_save(values.astype(np.int32) * 4, tmp_path / "int_large.tif"))
    with pytest.raises(BadImageError, match=r"float_large\.tif: 32-bit float .* outside \[0, 1\].*8- or 16-bit PNG"):
        read_image(_save(values.astype(np.float32), tmp_path / "float_large.tif"))


def test_16_bit_rgb_png_reads_as_its_high_byte(tmp_path: Path) -> None:
    # PIL has no 16-bit RGB mode; write the PNG by hand (RGB, 16 bits per channel, no filter).
    height, width = 4, 5
    values = np.arange(height * width * 3, dtype=np.uint16).reshape(height, width, 3) * 3000
    rows = b"".join(b"\x00" + values[row].astype(">u2").tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    path = tmp_path / "rgb16.png"
    path.write_bytes(png)
    image = read_image(path)
    assert torch.allclose(image, torch.from_numpy(values >> 8).permute(2, 0, 1).float() / 255.0)
    assert anomalib_reader_problem(path) is None


def test_transparency_is_composited_over_black(tmp_path: Path) -> None:
    rgb = _rgb()
    alpha = np.tile(np.linspace(0, 255, 16).round().astype(np.uint8), (12, 1))
    image = read_image(_save(np.dstack([rgb, alpha]), tmp_path / "rgba.png"))
    expected = torch.from_numpy(rgb / 255.0 * (alpha[..., None] / 255.0)).permute(2, 0, 1).float()
    assert torch.allclose(image, expected, atol=1e-6)
    assert torch.count_nonzero(image[:, :, 0]) == 0  # fully transparent column: black

    gray_alpha = read_image(_save(np.dstack([rgb[..., 0], alpha]), tmp_path / "la.png"))
    assert torch.allclose(gray_alpha[0], expected[0].new_tensor(rgb[..., 0] / 255.0 * alpha / 255.0), atol=1e-6)

    palette = Image.fromarray(rgb).convert("P")
    palette.save(tmp_path / "palette.png", transparency=int(np.asarray(palette)[0, 0]))
    transparent = read_image(tmp_path / "palette.png")
    assert torch.count_nonzero(transparent[:, 0, 0]) == 0


def test_opaque_alpha_equals_dropping_it(tmp_path: Path) -> None:
    rgb = _rgb()
    opaque = _save(np.dstack([rgb, np.full((12, 16), 255, np.uint8)]), tmp_path / "opaque.png")
    assert torch.equal(read_image(opaque), read_image(_save(rgb, tmp_path / "rgb.png")))
    assert anomalib_reader_problem(opaque) is None


@pytest.mark.parametrize(("height", "width"), [(1, 1), (2, 60), (60, 3), (5, 7)])
def test_small_and_non_square_images_keep_their_size(tmp_path: Path, height: int, width: int) -> None:
    path = _save(_rgb(height, width), tmp_path / "small.png")
    assert read_image(path).shape == (3, height, width)
    assert image_size(path) == (width, height)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".tif"])
def test_truncated_files_name_the_file_and_the_fix(tmp_path: Path, suffix: str) -> None:
    source = _save(_rgb(64, 64), tmp_path / f"full{suffix}")
    broken = _truncated_copy(source, tmp_path / f"broken{suffix}")
    with pytest.raises(BadImageError, match=rf"broken\{suffix}: the file is truncated.*Copy or export the file again"):
        read_image(broken)
    assert "truncated" in image_problem(broken)
    assert image_problem(broken, decode=False) is None  # the header alone looks fine
    assert "truncated" in anomalib_reader_problem(broken)


def test_unreadable_and_missing_files(tmp_path: Path) -> None:
    fake = tmp_path / "notes.png"
    fake.write_text("not an image")
    for check in (read_image, read_mask, image_size):
        with pytest.raises(BadImageError, match=r"notes\.png: not an image file that Pillow can read.*remove it"):
            check(fake)
    with pytest.raises(BadImageError, match=r"missing\.png: does not exist"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(BadImageError, match="is a folder, not an image file"):
        read_image(tmp_path)


def test_masks_of_any_depth_are_binarised(tmp_path: Path) -> None:
    mask = np.zeros((8, 10), np.uint8)
    mask[2:5, 3:7] = 1
    for name, array in (("m8.png", mask * 255), ("m16.png", mask.astype(np.uint16) * 300), ("m1.png", mask * 1)):
        loaded = read_mask(_save(array, tmp_path / name))
        assert loaded.dtype == torch.uint8 and torch.equal(loaded, torch.from_numpy(mask))
    rgba = np.dstack([np.repeat(mask[..., None] * 255, 3, axis=2), np.full((8, 10), 255, np.uint8)])
    assert torch.equal(read_mask(_save(rgba, tmp_path / "rgba.png")), torch.from_numpy(mask))


def test_anomalib_reader_problems(tmp_path: Path) -> None:
    rgb = _rgb()
    assert anomalib_reader_problem(_save(rgb, tmp_path / "rgb.jpg")) is None
    assert anomalib_reader_problem(_save(rgb[..., 0], tmp_path / "gray.png")) is None
    sixteen = _save(rgb[..., 0].astype(np.uint16) * 257, tmp_path / "gray16.png")
    assert "16-bit grayscale (mode I;16); anomalib's image reader would clip" in anomalib_reader_problem(sixteen)
    assert "16-bit" in anomalib_reader_problem(sixteen, decode=False)
    half = _save(np.dstack([rgb, np.full((12, 16), 128, np.uint8)]), tmp_path / "half.png")
    assert "transparent pixels" in anomalib_reader_problem(half, decode=False)


def test_check_files_lists_every_problem_with_the_fix(tmp_path: Path) -> None:
    good = [_save(_rgb(seed=seed), tmp_path / f"good{seed}.png") for seed in range(3)]
    bad = []
    for index in range(23):
        path = tmp_path / f"bad{index:02d}.png"
        path.write_bytes(b"")
        bad.append(path)
    with pytest.raises(BadImageError) as error:
        check_files([*good, *bad], what="images in the test", fix="Do this.")
    message = str(error.value)
    assert message.startswith("23 of 26 images in the test cannot be used:")
    assert "bad00.png" in message and "bad19.png" in message and "bad20.png" not in message
    assert "... and 3 more." in message and message.endswith("Do this.")
    check_files(good)  # no error


def test_list_image_files(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    (folder / ".hidden").mkdir()
    for path in (folder / "b.PNG", folder / "sub" / "a.jpg", folder / ".hidden" / "c.png", folder / ".d.png"):
        _save(_rgb(), path, format="PNG")
    (folder / "readme.txt").write_text("notes")
    assert list_image_files(folder) == [folder / "b.PNG", folder / "sub" / "a.jpg"]
    assert list_image_files(folder / "b.PNG") == [folder / "b.PNG"]

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BadImageError, match=r"No images found in .*empty or its sub-folders .*Give a folder"):
        list_image_files(empty)
    (empty / "photo.heic").write_bytes(b"...")
    with pytest.raises(BadImageError, match=r"It holds 1 other file\(s\), with extensions \['\.heic'\]"):
        list_image_files(empty)
    with pytest.raises(BadImageError, match="is not an image file"):
        list_image_files(folder / "readme.txt")
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        list_image_files(tmp_path / "nowhere")

"""The reference pre-processing against the reference's PIL pipeline, per image in batches, and in checkpoints.

The reference (zqhang/AnomalyCLIP) opens 8-bit images with PIL and applies, per image,
``Resize((518, 518), BICUBIC)`` (PIL's antialiased resize), ``ToTensor`` and CLIP's normalisation; its masks
(0/255, ``L`` mode) get ``Resize((518, 518))`` (bilinear), ``ToTensor`` and ``> 0.5``. Those definitions are
written out below with PIL and NumPy and compared with ours.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from anomalib.pre_processing import PreProcessor
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image
from torchvision import tv_tensors

from anomalib_anomalyclip import AnomalyCLIP
from anomalib_anomalyclip.data import AuxiliaryDataModule
from anomalib_anomalyclip.integration.pre_processor import AnomalyCLIPPreProcessor, ReferenceResize
from anomalib_anomalyclip.method.resize import resize_image_like_pil, resize_mask_like_pil

SIZE = 518
SHAPES = [(1024, 1024), (1000, 1500)]  # (height, width)
GREY_LEVEL = 1 / 255
CHECKPOINT_KEY = "anomalib_pre_processor_config"  # where anomalib stores the pre-processor's settings


def _photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """An 8-bit RGB image with texture, noise and sharp edges (where resampling differs most)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width]
    shade = 127 + 60 * np.sin(cols / 17.0) * np.cos(rows / 23.0)
    image = shade[..., None] + rng.normal(0, 30, (height, width, 3))
    image[(cols // 50 + rows // 50) % 2 == 0] += 40
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _thin_mask(height: int, width: int) -> np.ndarray:
    """A 0/1 mask with 1- and 2-pixel scratches (straight and slanted) and a small blob."""
    rows, cols = np.mgrid[0:height, 0:width]
    mask = np.zeros((height, width), np.uint8)
    mask[100:102, 50 : width - 50] = 1
    mask[:, 301] = 1
    mask[200:600, 400:403] = 1
    mask[np.abs(cols - 0.7 * rows - 100) < 0.8] = 1
    mask[np.abs(cols + 1.3 * rows - 900) < 0.5] = 1
    mask[500:530, 500:530] = 1
    return mask


def _reference_image(image: np.ndarray, size: int = SIZE) -> np.ndarray:
    """The reference's image pipeline up to ``ToTensor``: PIL bicubic, then [0, 1], (C, H, W)."""
    resized = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))
    return resized.transpose(2, 0, 1).astype(np.float32) / 255


def _reference_mask(mask: np.ndarray, size: tuple[int, int] = (SIZE, SIZE)) -> np.ndarray:
    """The reference's mask pipeline: 0/255 ``L`` image, PIL bilinear, ``ToTensor`` and ``> 0.5``."""
    image = Image.fromarray((mask > 0).astype(np.uint8) * 255, mode="L")
    return np.asarray(image.resize(size[::-1], Image.Resampling.BILINEAR)).astype(np.float32) / 255 > 0.5


def _normalise(image: np.ndarray) -> np.ndarray:
    mean = np.asarray(OPENAI_DATASET_MEAN, np.float32)[:, None, None]
    std = np.asarray(OPENAI_DATASET_STD, np.float32)[:, None, None]
    return (image - mean) / std


@pytest.mark.parametrize("exportable", [False, True], ids=["eager", "export-form"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: f"{shape[1]}x{shape[0]}")
def test_images_are_within_one_grey_level_of_the_reference(shape: tuple[int, int], exportable: bool) -> None:
    image = _photo(*shape)
    ours = resize_image_like_pil(torch.from_numpy(image).permute(2, 0, 1) / 255, (SIZE, SIZE), exportable)
    difference = np.abs(ours.numpy() - _reference_image(image))
    assert difference.max() <= GREY_LEVEL + 1e-6
    assert (difference > 1e-6).mean() < 0.01  # off by one level on under 1 % of the values


@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: f"{shape[1]}x{shape[0]}")
def test_normalised_images_and_thin_masks_match_the_reference(shape: tuple[int, int]) -> None:
    image, mask = _photo(*shape, seed=1), _thin_mask(*shape)
    pre_processor = AnomalyCLIPPreProcessor((SIZE, SIZE))
    ours_image, ours_mask = pre_processor.transform(
        tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1) / 255), tv_tensors.Mask(torch.from_numpy(mask))
    )
    expected = _normalise(_reference_image(image))
    assert np.abs(ours_image.numpy() - expected).max() <= GREY_LEVEL / min(OPENAI_DATASET_STD) + 1e-5
    assert isinstance(ours_mask, tv_tensors.Mask)
    assert ours_mask.dtype == torch.uint8
    np.testing.assert_array_equal(ours_mask.numpy().astype(bool), _reference_mask(mask))
    assert _reference_mask(mask).sum() > 500  # the thin structures survive, so the comparison means something


def test_masks_keep_their_dtype_device_and_leading_dimensions() -> None:
    masks = torch.zeros(2, 1, 40, 60, dtype=torch.bool)
    masks[0, 0, 10, :] = True
    resized = resize_mask_like_pil(masks, (20, 30))
    assert resized.shape == (2, 1, 20, 30)
    assert resized.dtype == torch.bool
    np.testing.assert_array_equal(resized[0, 0].numpy(), _reference_mask(masks[0, 0].numpy(), (20, 30)))
    assert not resized[1].any()


def _write_mixed_sizes(root: Path) -> Path:
    """A labelled folder source whose images (and masks) have three different sizes."""
    for folder in ("good", "bad", "masks"):
        (root / folder).mkdir(parents=True)
    shapes = {"a": (40, 60), "b": (64, 48), "c": (52, 52)}
    for index, (name, (height, width)) in enumerate(shapes.items()):
        Image.fromarray(_photo(height, width, seed=index)).save(root / "good" / f"{name}.png")
        Image.fromarray(_photo(height, width, seed=10 + index)).save(root / "bad" / f"{name}.png")
        mask = np.zeros((height, width), np.uint8)
        mask[height // 3, 5:-5] = 255
        mask[5:-5, width // 2 : width // 2 + 2] = 255
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")
    return root


def test_mixed_sizes_are_resized_once_per_image_before_batching(tmp_path: Path) -> None:
    source = {"format": "folder", "root": str(_write_mixed_sizes(tmp_path)), "normal_dir": "good"}
    source |= {"abnormal_dir": "bad", "mask_dir": "masks"}
    datamodule = AuxiliaryDataModule(sources=[source], train_batch_size=6, num_workers=0)
    pre_processor = AnomalyCLIPPreProcessor((56, 56))
    datamodule.trainer = SimpleNamespace(model=SimpleNamespace(pre_processor=pre_processor))  # as under a Trainer
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    pre_processor.on_train_batch_start(None, None, batch, 0)
    assert batch.image.shape == (6, 3, 56, 56)
    assert sum(bool(path) for path in batch.mask_path) == 3
    for image, mask, image_path, mask_path in zip(
        batch.image, batch.gt_mask, batch.image_path, batch.mask_path, strict=True
    ):
        with Image.open(image_path) as file:
            original = np.asarray(file.convert("RGB"))
        single = pre_processor.transform(tv_tensors.Image(torch.from_numpy(original).permute(2, 0, 1) / 255))
        torch.testing.assert_close(image, single.as_subclass(torch.Tensor), rtol=0, atol=0)
        if mask_path:
            with Image.open(mask_path) as file:
                np.testing.assert_array_equal(mask.numpy().astype(bool), _reference_mask(np.asarray(file), (56, 56)))


def test_reference_resize_is_what_anomalib_datamodules_append_to_the_datasets() -> None:
    pre_processor = AnomalyCLIPPreProcessor((56, 56))
    resize = pre_processor.transform.transforms[0]
    assert isinstance(resize, ReferenceResize)
    assert resize.antialias and not resize.exportable
    assert pre_processor.export_transform.transforms[0].exportable  # anomalib's export turns antialias off


def test_settings_survive_a_checkpoint(tiny_clip_path: Path, tmp_path: Path) -> None:
    model = AnomalyCLIP(pretrained=str(tiny_clip_path), image_size=56)
    assert isinstance(model.pre_processor, AnomalyCLIPPreProcessor)
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    del checkpoint["state_dict"]
    torch.save(checkpoint, tmp_path / "model.ckpt")  # plain data: loads with weights_only=True
    restored = AnomalyCLIPPreProcessor((518, 518))
    restored.load_checkpoint_config(torch.load(tmp_path / "model.ckpt", weights_only=True)[CHECKPOINT_KEY])
    assert restored.image_size == [56, 56]
    assert restored.transform.transforms[0].size == [56, 56]
    assert restored.export_transform.transforms[0].exportable
    stock = PreProcessor()  # a model loaded with preprocessing=fast gets the float resize, not nothing
    stock.load_checkpoint_config(checkpoint[CHECKPOINT_KEY])
    assert [type(step).__name__ for step in stock.transform.transforms] == ["Resize", "Normalize"]
    assert stock.transform.transforms[0].size == [56, 56]
    anomalib_config = PreProcessor().checkpoint_config()  # a checkpoint of another pre-processor
    restored.load_checkpoint_config(anomalib_config)
    assert restored.image_size == [56, 56]


def test_fast_mode_is_anomalibs_pre_processor(tiny_clip_path: Path) -> None:
    model = AnomalyCLIP(pretrained=str(tiny_clip_path), image_size=56, preprocessing="fast")
    assert type(model.pre_processor) is PreProcessor
    assert tuple(model.input_size) == (56, 56)
    with pytest.raises(ValueError, match="preprocessing must be one of 'reference', 'fast', got 'pil'"):
        AnomalyCLIP.configure_pre_processor((56, 56), "pil")


def test_the_matrix_form_equals_the_cpu_kernel() -> None:
    """The arithmetic used in exported graphs and on other devices gives the CPU kernel's grey levels."""
    image = torch.randint(0, 256, (1, 3, 300, 410), generator=torch.Generator().manual_seed(2)) / 255
    kernel = resize_image_like_pil(image, (SIZE, SIZE))
    torch.testing.assert_close(resize_image_like_pil(image, (SIZE, SIZE), exportable=True), kernel, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        resize_image_like_pil(image.double(), (SIZE, SIZE), True).float(), kernel, rtol=0, atol=1e-6
    )

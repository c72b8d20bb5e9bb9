"""Tiled inference: tiles in, one map out; the tiler of anomalib's callback; fusions; few-shot tiles; bad input.

A tiny CLIP (6 vision blocks) at a 56 px input (4 x 4 patches) keeps every forward to milliseconds; the working sizes
are a few tiles across, which is all the geometry needs.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from anomalib.callbacks import TilerConfigurationCallback
from anomalib.data.utils.tiler import Tiler
from lightning.pytorch import Trainer
from lightning.pytorch.trainer.states import TrainerFn

from anomalib_anomalyclip import AnomalyCLIP
from anomalib_anomalyclip.config import Tiling
from anomalib_anomalyclip.errors import AnomalyCLIPError
from anomalib_anomalyclip.integration.pre_processor import AnomalyCLIPPreProcessor, clip_pre_processor, follow_tiling
from anomalib_anomalyclip.method.tiled_model import check_tiled_export, check_tiled_training
from anomalib_anomalyclip.method.tiling import (
    TileFusion,
    TilingError,
    cut_views,
    join_tiles,
    tiling_config,
)
from anomalib_anomalyclip.testing.tiny_clip import TinyClipConfig, save_openai_state_dict

SIZE = 56
WORKING = (140, 168)  # 3 x 4 tiles at stride 42 (flush last tiles), 12 tiles in all
TILED = {"tiling": Tiling(enabled=True, tile_size=SIZE, stride=42, working_size=WORKING)}


def _model(clip: Path, prompts: Path, **kwargs) -> AnomalyCLIP:
    return AnomalyCLIP(
        pretrained=str(clip), prompt_weights=str(prompts), image_size=SIZE, dpam_start_layer=3, visualizer=False,
        evaluator=False, **kwargs,
    ).eval()  # fmt: skip


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_openai_state_dict(tmp_path_factory.mktemp("tiling") / "clip.pt", TinyClipConfig(vision_layers=6))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Three CLIP-normalised images at the working size."""
    return torch.randn(3, 3, *WORKING, generator=torch.Generator().manual_seed(0))


def _config(fusion: str = "tiles", working: tuple[int, int] = WORKING, stride: int = 42, border: int = 0):
    return tiling_config(SIZE, stride, SIZE, Tiling(working_size=working, fusion=fusion), border)


def test_tiles_are_crops_that_join_back_as_anomalibs_untile_does() -> None:
    image = torch.rand(2, 3, 168, 224, generator=torch.Generator().manual_seed(1))
    exact = _config(working=(168, 224), stride=28)  # (168 - 56) / 28 whole steps: anomalib pads nothing
    tiler = Tiler(SIZE, 28)
    assert torch.equal(cut_views(image, exact), tiler.tile(image))
    maps = torch.rand(tiler.tile(image).shape[0], 1, SIZE, SIZE)
    assert torch.allclose(join_tiles(maps, exact, (168, 224)), tiler.untile(maps), atol=1e-6)

    uneven = _config(working=(150, 200), stride=42)  # the last tile of each row and column is flush with the edge
    assert uneven.tile_starts((150, 200)) == ([0, 42, 84, 94], [0, 42, 84, 126, 144])
    picture = image[..., :150, :200]
    assert torch.allclose(join_tiles(cut_views(picture, uneven), uneven, (150, 200)), picture)
    with_border = _config(working=(150, 200), stride=40, border=8)  # inner borders dropped, every pixel still seen
    assert torch.allclose(join_tiles(cut_views(picture, with_border), with_border, (150, 200)), picture)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"tile_size": 64}, "tile_size 64x64 differs from the model's input size 56"),
        ({"tiling": {"enabled": True, "stride": 70}}, "stride 70x70 is larger than the tile"),
        ({"tiling": {"enabled": True, "working_size": [48, 300]}}, "working resolution 48x300 is smaller than a tile"),
        ({"tiling": {"fusion": "median"}}, "tiling.fusion must be one of"),
        ({"tiling": True, "mutual": {"enabled": True, "blocks": [3, 6]}}, "Tiling and mutual scoring do not"),
    ],
)
def test_bad_tiling_is_refused_at_construction(
    clip_path: Path, tiny_prompt_path: Path, arguments: dict, message: str
) -> None:
    with pytest.raises(AnomalyCLIPError, match=message) as caught:
        _model(clip_path, tiny_prompt_path, **arguments)
    assert isinstance(caught.value, ValueError)


def test_anomalibs_tiler_callback_sets_the_tiling_of_the_model_arguments(
    clip_path: Path, tiny_prompt_path: Path, images: torch.Tensor
) -> None:
    by_arguments = _model(clip_path, tiny_prompt_path, **TILED)
    by_callback = _model(clip_path, tiny_prompt_path, tiling={"working_size": list(WORKING)})
    assert by_callback.model.tiler is None and by_callback.pre_processor.image_size == [SIZE, SIZE]
    TilerConfigurationCallback(enable=True, tile_size=SIZE, stride=42).setup(None, by_callback)
    assert by_callback.model.tiling == by_arguments.model.tiling
    assert isinstance(by_callback.model.tiler, Tiler) and by_callback.model.tiler.stride_h == 42
    follow_tiling(by_callback)  # what the module's setup does after the callback's
    assert by_callback.pre_processor.image_size == by_arguments.pre_processor.image_size == list(WORKING)
    with torch.inference_mode():
        first, second = by_arguments.model(images), by_callback.model(images)
    assert torch.equal(first.anomaly_map, second.anomaly_map) and torch.equal(first.pred_score, second.pred_score)
    with pytest.raises(TilingError, match="differs from the model's input size"):
        by_callback.model.tiler = Tiler(64, 32)


def test_maps_come_at_the_working_size_and_batches_score_as_single_images(
    clip_path: Path, tiny_prompt_path: Path, images: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model(clip_path, tiny_prompt_path, **TILED)
    with torch.inference_mode():
        batch = model.model(images)
        alone = [model.model(image[None]) for image in images]
        monkeypatch.setattr("anomalib_anomalyclip.method.tiling.VIEWS_PER_CALL", 1)  # one image per encoder call
        chunked = model.model(images)
    assert batch.anomaly_map.shape == (3, 1, *WORKING) and batch.pred_score.shape == (3,)
    assert torch.allclose(batch.anomaly_map, torch.cat([out.anomaly_map for out in alone]), atol=1e-5)
    assert torch.allclose(chunked.pred_score, batch.pred_score, atol=1e-6)
    # The whole pipeline: any image size in [0, 1], resized to the working size inside.
    with torch.inference_mode():
        outputs = model(torch.rand(1, 3, 300, 260))
    assert outputs.anomaly_map.shape == (1, 1, *WORKING)


def test_fusions_follow_the_documented_rule(clip_path: Path, tiny_prompt_path: Path, images: torch.Tensor) -> None:
    """Without smoothing: mean = (T + G) / 2 and max = max(T, G) for maps, with max_t s_t and s_g for scores."""
    model = _model(clip_path, tiny_prompt_path, smoothing_sigma=0, **TILED)
    outputs = {}
    for fusion in TileFusion:
        model.model.use_tiling(replace(model.model.tiling, fusion=fusion))
        with torch.inference_mode():
            outputs[fusion] = model.model(images)
    tiles, mean, largest = outputs[TileFusion.TILES], outputs[TileFusion.MEAN], outputs[TileFusion.MAX]
    whole_map = 2 * mean.anomaly_map - tiles.anomaly_map
    whole_score = 2 * mean.pred_score - tiles.pred_score
    assert torch.allclose(largest.anomaly_map, torch.maximum(tiles.anomaly_map, whole_map), atol=1e-5)
    assert torch.allclose(largest.pred_score, torch.maximum(tiles.pred_score, whole_score), atol=1e-6)
    assert not torch.allclose(tiles.anomaly_map, whole_map)  # the global view does see something else


def test_few_shot_bank_holds_every_view_of_each_reference(
    clip_path: Path, tiny_prompt_path: Path, images: torch.Tensor
) -> None:
    model = _model(clip_path, tiny_prompt_path, k_shot=2, few_shot_fusion="few_shot", **TILED)
    torch_model = model.model
    views = torch_model.tiling.views_per_image(WORKING)
    assert views == 12 + 1
    with torch.inference_mode():
        left_out = torch_model.remember_references(images[:2])
        own = torch_model(images[:1])
        other = torch_model(images[2:])
    tokens = (SIZE // 14) ** 2
    assert torch_model.few_shot.memory.shape[:2] == (1, 2 * views * tokens)
    assert f"memory bank 1x{2 * views * tokens}x" in torch_model.describe_bank()
    assert left_out.anomaly_map.shape == (2, 1, *WORKING) and left_out.pred_score.min() > 0
    assert own.anomaly_map.abs().max() < 1e-5  # every region of a reference is in the bank
    assert other.anomaly_map.max() > 0.01


def test_training_and_untiled_exports_of_own_size_tiling_are_refused(clip_path: Path) -> None:
    tiling = tiling_config(SIZE, None, SIZE)  # each image's own size
    with pytest.raises(TilingError, match="Learn the prompts without tiling"):
        check_tiled_training(tiling)
    with pytest.raises(TilingError, match="--input_size H W"):
        check_tiled_export(tiling, None)
    assert check_tiled_export(tiling, (1536, 2048)).working_size == (1536, 2048)
    # A model learning prompts refuses tiling when the fit starts.
    model = AnomalyCLIP(pretrained=str(clip_path), image_size=SIZE, tiling=True, visualizer=False)
    with pytest.raises(TilingError):
        model.setup(TrainerFn.FITTING)


def test_a_checkpoint_of_an_untiled_model_keeps_the_working_size(
    clip_path: Path, tiny_prompt_path: Path, tmp_path: Path
) -> None:
    untiled = _model(clip_path, tiny_prompt_path)
    trainer = Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", default_root_dir=tmp_path)
    trainer.strategy.connect(untiled)
    trainer.save_checkpoint(tmp_path / "untiled.ckpt")
    tiled = _model(clip_path, tiny_prompt_path, **TILED)
    tiled.on_load_checkpoint(torch.load(tmp_path / "untiled.ckpt", map_location="cpu", weights_only=False))
    assert tiled.pre_processor.image_size == list(WORKING)


def test_own_size_pre_processing_only_normalises_and_survives_a_checkpoint() -> None:
    image = torch.rand(1, 3, 90, 130)
    pre_processor = clip_pre_processor(None)
    assert pre_processor.transform(image).shape == image.shape
    restored = AnomalyCLIPPreProcessor()
    restored.load_checkpoint_config(pre_processor.checkpoint_config())
    assert restored.image_size is None and torch.equal(restored.transform(image), pre_processor.transform(image))
    fast = clip_pre_processor(None, "fast")
    assert torch.allclose(fast.transform(image), pre_processor.transform(image))

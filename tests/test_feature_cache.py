"""The feature cache of prompt training: same prompts as without it, keyed, checked, shared between ranks."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Trainer
from torchvision.transforms.v2 import Compose, Grayscale, Normalize, RandomHorizontalFlip, Resize

from anomalib_anomalyclip.data import AuxiliaryDataModule
from anomalib_anomalyclip.integration.feature_cache import (
    DATA_NAME,
    INDEX_NAME,
    CacheStats,
    FeatureCache,
    FeatureLayout,
    RankSync,
    cache_key,
    cache_location,
    nondeterministic_transforms,
    open_feature_cache,
    training_feature_cache,
)
from anomalib_anomalyclip.integration.lightning_model import AnomalyCLIP
from anomalib_anomalyclip.method.torch_model import AnomalyCLIPModel
from anomalib_anomalyclip.testing.toy_data import make_mvtec_like_dataset

SIZE = 28
EPOCHS = 3


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: a second thread only adds synchronisation (and much more on a busy machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("feature_cache_data")
    make_mvtec_like_dataset(root, categories=("alpha", "beta"), image_size=32, n_test_good=3, n_test_defect=3)
    return root


@pytest.fixture(scope="module")
def image_paths(data_root: Path) -> list[str]:
    return sorted(str(path) for path in data_root.glob("*/test/*/*.png"))


@pytest.fixture(scope="module")
def encoder(tiny_clip_path: Path) -> torch.nn.Module:
    return AnomalyCLIPModel(pretrained=str(tiny_clip_path), image_size=SIZE).visual_encoder


def _layout(encoder: torch.nn.Module, size: int = SIZE, dtype_name: str = "float32") -> FeatureLayout:
    return FeatureLayout.for_encoder(encoder, (size, size), dtype_name)


def _open(encoder: torch.nn.Module, paths: list[str], directory: Path | None, **kwargs) -> FeatureCache:
    key = cache_key(encoder, (SIZE, SIZE), ["Resize(28)"])
    return open_feature_cache(key, _layout(encoder), paths, directory, **kwargs)


def _images(count: int, seed: int = 0, size: int = SIZE) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _assert_same_features(cached: tuple, direct: tuple) -> None:
    """Equal up to the rounding differences of the visual forward on differently composed batches."""
    torch.testing.assert_close(cached[0], direct[0], rtol=1e-4, atol=1e-5)
    for cached_layer, direct_layer in zip(cached[1], direct[1], strict=True):
        torch.testing.assert_close(cached_layer, direct_layer, rtol=1e-4, atol=1e-5)


def _fit(
    tiny_clip_path: Path,
    data_root: Path,
    root_dir: Path,
    validate: bool = False,
    data_args: dict | None = None,
    on_model: Callable[[AnomalyCLIP], None] | None = None,
    **model_args,
) -> AnomalyCLIP:
    model = AnomalyCLIP(
        pretrained=str(tiny_clip_path), image_size=SIZE, epochs=EPOCHS, evaluator=False, visualizer=False, **model_args
    )
    if on_model is not None:
        on_model(model)
    datamodule = AuxiliaryDataModule(
        root=data_root, train_batch_size=4, eval_batch_size=4, num_workers=0, seed=3, **(data_args or {})
    )
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=EPOCHS,
        limit_val_batches=1.0 if validate else 0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        default_root_dir=root_dir,
    )
    trainer.fit(model, datamodule=datamodule)
    return model


def _epoch_stats(caplog: pytest.LogCaptureFixture) -> list[CacheStats]:
    return [record.feature_cache_stats for record in caplog.records if hasattr(record, "feature_cache_stats")]


def test_cached_training_learns_the_prompts_of_uncached_training(
    tiny_clip_path: Path, data_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    uncached = _fit(tiny_clip_path, data_root, tmp_path / "uncached", feature_cache=False)
    with caplog.at_level(logging.INFO, logger="anomalib_anomalyclip.integration.feature_cache"):
        cached = _fit(tiny_clip_path, data_root, tmp_path / "cached")
    expected = uncached.model.prompt_learner.state_dict()
    for name, tensor in cached.model.prompt_learner.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-5, msg=name)
    untrained = AnomalyCLIP(pretrained=str(tiny_clip_path)).model.prompt_learner.normal_context
    assert not torch.equal(expected["normal_context"], untrained)
    stats = _epoch_stats(caplog)
    assert [(entry.hits, entry.misses) for entry in stats] == [(0, 12), (12, 0), (12, 0)]
    assert "12 images x" in caplog.text and "in memory" in caplog.text
    assert cached.train_features is None  # released at the end of training


def _fit_counting(tiny_clip_path: Path, data_root: Path, root_dir: Path, **kwargs) -> tuple[AnomalyCLIP, int]:
    """Fit with validation after every epoch; returns the model and how many images its visual encoder saw."""
    encoded: list[int] = []

    def count_encoded_images(model: AnomalyCLIP) -> None:
        model.model.visual_encoder.register_forward_hook(lambda module, inputs, output: encoded.append(len(inputs[0])))

    model = _fit(tiny_clip_path, data_root, root_dir, validate=True, on_model=count_encoded_images, **kwargs)
    return model, sum(encoded)


def test_validation_during_fit_is_served_from_the_cache(
    tiny_clip_path: Path, data_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    uncached, uncached_images = _fit_counting(tiny_clip_path, data_root, tmp_path / "uncached", feature_cache=False)
    with caplog.at_level(logging.INFO, logger="anomalib_anomalyclip.integration.feature_cache"):
        cached, cached_images = _fit_counting(tiny_clip_path, data_root, tmp_path / "cached")
    # 12 labelled images, trained on and validated on, 3 epochs.
    assert uncached_images == EPOCHS * (12 + 12)
    assert cached_images == 12  # the first training epoch only
    assert [(entry.hits, entry.misses) for entry in _epoch_stats(caplog)] == [(0, 12), (12, 0), (12, 0)]
    # Validation sets anomalib's thresholds and normalisation: the same from cached features.
    statistics = cached.post_processor.state_dict()
    assert torch.isfinite(statistics["_image_threshold"]) and torch.isfinite(statistics["_pixel_threshold"])
    for name, expected in uncached.post_processor.state_dict().items():
        torch.testing.assert_close(statistics[name], expected, rtol=0, atol=1e-6, equal_nan=True, msg=name)


def test_validation_with_other_pre_processing_runs_the_encoder(
    tiny_clip_path: Path, data_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    other = {"val_augmentations": Compose([Grayscale(num_output_channels=3)])}
    with caplog.at_level(logging.INFO, logger="anomalib_anomalyclip.integration.feature_cache"):
        _, encoded_images = _fit_counting(tiny_clip_path, data_root, tmp_path, data_args=other)
    assert encoded_images == 12 + EPOCHS * 12
    assert "not used for validation: the validation images are pre-processed differently" in caplog.text


def test_persistent_cache_is_reused_by_the_next_run(
    tiny_clip_path: Path, data_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="anomalib_anomalyclip.integration.feature_cache"):
        first = _fit(tiny_clip_path, data_root, tmp_path / "first", feature_cache_dir=str(directory))
        second = _fit(tiny_clip_path, data_root, tmp_path / "second", feature_cache_dir=str(directory))
    assert [(entry.hits, entry.misses) for entry in _epoch_stats(caplog)] == [(0, 12), *[(12, 0)] * 5]
    (folder,) = directory.iterdir()
    assert {path.name for path in folder.iterdir()} == {INDEX_NAME, DATA_NAME}
    for name, tensor in second.model.prompt_learner.state_dict().items():
        torch.testing.assert_close(tensor, first.model.prompt_learner.state_dict()[name], rtol=0, atol=1e-5)


def test_features_come_back_in_batch_order_whatever_was_cached(encoder: torch.nn.Module, image_paths: list) -> None:
    cache = _open(encoder, image_paths, None)
    images = _images(6)
    with torch.no_grad():
        direct = encoder(images)
    cache.features(images[[1, 3]], [image_paths[1], image_paths[3]], encoder)
    cached = cache.features(images, image_paths[:6], encoder)
    _assert_same_features(cached, direct)
    assert cache.end_epoch() == CacheStats(epoch=1, hits=2, misses=6, recomputed=0, filled=6, capacity=12)


def test_images_outside_the_training_set_are_computed_not_stored(encoder: torch.nn.Module, image_paths: list) -> None:
    cache = _open(encoder, image_paths, None)
    images = _images(2)
    with torch.no_grad():
        direct = encoder(images)
    _assert_same_features(cache.features(images, ["/elsewhere/a.png", image_paths[0]], encoder), direct)
    assert cache.filled == 1
    with pytest.raises(ValueError, match="turn the cache off"):
        cache.features(torch.zeros(1, 3, 42, 42), image_paths[:1], encoder)


def _closed_disk_cache(
    encoder: torch.nn.Module, image_paths: list, directory: Path
) -> tuple[torch.Tensor, tuple, FeatureCache]:
    """Four images, their features computed directly, and a disk cache filled with them and closed."""
    images = _images(4)
    with torch.no_grad():
        direct = encoder(images)
    cache = _open(encoder, image_paths, directory)
    cache.features(images, image_paths[:4], encoder)
    cache.end_epoch()
    cache.close()
    return images, direct, cache


def test_disk_cache_survives_reopening(encoder: torch.nn.Module, image_paths: list, tmp_path: Path) -> None:
    images, direct, _ = _closed_disk_cache(encoder, image_paths, tmp_path)
    reopened = _open(encoder, image_paths, tmp_path)
    _assert_same_features(reopened.features(images, image_paths[:4], encoder), direct)
    assert reopened.end_epoch().hits == 4


def test_changing_image_size_or_layers_invalidates_the_cache(
    tiny_clip_path: Path, encoder: torch.nn.Module, image_paths: list, tmp_path: Path
) -> None:
    base = cache_key(encoder, (SIZE, SIZE), ["Resize(28)"])
    layered = AnomalyCLIPModel(pretrained=str(tiny_clip_path), image_size=SIZE, feature_layers=(12, 24))
    other_dpam = AnomalyCLIPModel(pretrained=str(tiny_clip_path), image_size=SIZE, dpam_start_layer=20)
    variants = {
        "image size": cache_key(encoder, (42, 42), ["Resize(42)"]),
        "layers": cache_key(layered.visual_encoder, (SIZE, SIZE), ["Resize(28)"]),
        "dpam": cache_key(other_dpam.visual_encoder, (SIZE, SIZE), ["Resize(28)"]),
        "pre-processing": cache_key(encoder, (SIZE, SIZE), ["Resize(28, bilinear)"]),
        "precision": cache_key(encoder, (SIZE, SIZE), ["Resize(28)"], precision="bf16-mixed"),
    }
    for name, key in variants.items():
        assert key != base, name
    other_dpam.visual_encoder.visual.proj.data.add_(1.0)
    assert cache_key(other_dpam.visual_encoder, (SIZE, SIZE))["visual_weights"] != base["visual_weights"]

    cache = _open(encoder, image_paths, tmp_path)
    cache.features(_images(4), image_paths[:4], encoder)
    cache.end_epoch()
    for key, size, layer_encoder in [
        (variants["image size"], 42, encoder),
        (variants["layers"], SIZE, layered.visual_encoder),
    ]:
        other = open_feature_cache(key, _layout(layer_encoder, size), image_paths, tmp_path)
        other.features(_images(4, size=size), image_paths[:4], layer_encoder)
        assert other.end_epoch().misses == 4
        assert other.directory != cache.directory


def test_foreign_index_in_the_cache_folder_is_not_read(
    encoder: torch.nn.Module, image_paths: list, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = _open(encoder, image_paths, tmp_path)
    cache.features(_images(4), image_paths[:4], encoder)
    cache.end_epoch()
    index = json.loads((cache.directory / INDEX_NAME).read_text())
    index["key"]["feature_layers"] = [12]
    (cache.directory / INDEX_NAME).write_text(json.dumps(index))
    with caplog.at_level(logging.WARNING, logger="anomalib_anomalyclip.integration.feature_cache"):
        reopened = _open(encoder, image_paths, tmp_path)
    assert "written for other features" in caplog.text
    assert reopened.filled == 0


@pytest.mark.parametrize("damage", ["flipped bytes", "truncated data", "garbled index"])
def test_corrupted_cache_file_is_detected_and_rebuilt(
    encoder: torch.nn.Module, image_paths: list, tmp_path: Path, damage: str
) -> None:
    images, direct, cache = _closed_disk_cache(encoder, image_paths, tmp_path)
    data, index = cache.directory / DATA_NAME, cache.directory / INDEX_NAME
    if damage == "flipped bytes":
        with data.open("r+b") as file:
            file.seek(_layout(encoder).row_bytes + 8)  # inside row 1
            file.write(b"\xff\xff\xff\x7f")
    elif damage == "truncated data":
        with data.open("r+b") as file:
            file.truncate(data.stat().st_size - 4)
    else:
        index.write_text(index.read_text()[:-20])

    reopened = _open(encoder, image_paths, tmp_path)
    _assert_same_features(reopened.features(images, image_paths[:4], encoder), direct)
    stats = reopened.end_epoch()
    if damage == "flipped bytes":
        assert (stats.hits, stats.misses, stats.recomputed) == (3, 1, 1)
    else:
        assert (stats.hits, stats.misses) == (0, 4)
    again = _open(encoder, image_paths, tmp_path)  # the rebuilt rows are valid
    again.features(images, image_paths[:4], encoder)
    assert again.end_epoch().hits == 4


def test_an_image_changed_on_disk_is_recomputed(
    encoder: torch.nn.Module, data_root: Path, image_paths: list, tmp_path: Path
) -> None:
    cache = _open(encoder, image_paths, tmp_path)
    cache.features(_images(4), image_paths[:4], encoder)
    cache.end_epoch()
    status = os.stat(image_paths[2])
    os.utime(image_paths[2], ns=(status.st_atime_ns, status.st_mtime_ns + 1_000_000))
    reopened = _open(encoder, image_paths, tmp_path)
    reopened.features(_images(4), image_paths[:4], encoder)
    assert (reopened.end_epoch().hits, reopened.history[0].misses) == (3, 1)


def test_augmented_training_images_switch_the_cache_off(caplog: pytest.LogCaptureFixture) -> None:
    assert nondeterministic_transforms(Compose([Resize(28), Normalize([0.5] * 3, [0.5] * 3)])) == []
    flip = Compose([RandomHorizontalFlip(), Resize(28)])
    assert nondeterministic_transforms(flip) == ["RandomHorizontalFlip"]
    dataset = SimpleNamespace(samples=SimpleNamespace(columns=["image_path"]), augmentations=flip)
    trainer = SimpleNamespace(train_dataloader=SimpleNamespace(dataset=dataset))
    module = SimpleNamespace(pre_processor=SimpleNamespace(transform=Resize(28)))
    with caplog.at_level(logging.INFO, logger="anomalib_anomalyclip.integration.feature_cache"):
        assert training_feature_cache(trainer, module) is None
    assert "augmented (RandomHorizontalFlip)" in caplog.text


def test_storage_follows_the_process_layout(tmp_path: Path) -> None:
    def trainer(world_size: int = 1, num_nodes: int = 1, rank: int = 0) -> SimpleNamespace:
        return SimpleNamespace(
            default_root_dir=str(tmp_path), world_size=world_size, num_nodes=num_nodes, global_rank=rank
        )

    assert cache_location(trainer(), None, 1000)[0] is None  # small: in memory
    assert cache_location(trainer(), None, 1 << 60) == (tmp_path / "feature_cache", RankSync(), True)
    assert cache_location(trainer(), tmp_path / "mine", 1000) == (tmp_path / "mine", RankSync(), False)
    # Without a process group to share one file (here: torch.distributed is not initialised), one cache per rank.
    folder, sync, temporary = cache_location(trainer(world_size=4, num_nodes=2, rank=3), None, 1000)
    assert (folder, sync.world_size, temporary) == (tmp_path / "feature_cache" / "rank3", 1, True)


class _ThreadRanks:
    """Ranks played by threads: a barrier and an element-wise sum, as DDP would provide."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=60)
        self.parts: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.calls = [0] * size

    def sync(self, rank: int) -> RankSync:
        def total(tensor: torch.Tensor) -> torch.Tensor:
            call = self.calls[rank]
            self.calls[rank] += 1
            self.parts[call].append(tensor)
            self.barrier.wait()
            return torch.stack(self.parts[call]).sum(0)

        return RankSync(rank, self.size, self.barrier.wait, total)


def test_ranks_share_one_file_and_drop_rows_written_twice(
    encoder: torch.nn.Module, image_paths: list, tmp_path: Path
) -> None:
    images = _images(4)
    with torch.no_grad():
        direct = encoder(images)
    ranks = _ThreadRanks(2)
    # Epoch 1: image 2 goes to both ranks (a DistributedSampler pads so); epoch 2 swaps the images.
    schedule = {0: [[0, 1, 2], [2, 3]], 1: [[2, 3], [0, 1]]}
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            cache = _open(encoder, image_paths, tmp_path, sync=ranks.sync(rank))
            outputs = []
            for seen in schedule[rank]:
                outputs.append((seen, cache.features(images[seen], [image_paths[i] for i in seen], encoder)))
                cache.end_epoch()
            results[rank] = [outputs, cache.history]
            cache.close()
        except BaseException as error:  # surfaced in the main thread
            errors.append(error)
            ranks.barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for rank in range(2):
        outputs, history = results[rank]
        for seen, features in outputs:
            _assert_same_features(features, (direct[0][seen], [layer[seen] for layer in direct[1]]))
        # Summed over both ranks: 5 misses (image 2 twice), then 3 hits and image 2 again.
        assert [(entry.hits, entry.misses, entry.filled) for entry in history] == [(0, 5, 3), (3, 1, 4)]

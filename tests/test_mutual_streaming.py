"""Streamed mutual scoring (pool_scoring, pool_state): today's in-memory scores, resume, stale state, assignment."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from test_mutual_scoring_cli import counting_encoder
from torch.utils.data import DataLoader

from anomalib_anomalyclip import AnomalyCLIP
from anomalib_anomalyclip.data.predict import ImageFolderDataset
from anomalib_anomalyclip.integration.pool_scoring import MutualPoolError, PoolSettings, assign_subsets, score_pools
from anomalib_anomalyclip.integration.pool_state import PoolState, PoolStateError
from anomalib_anomalyclip.testing.toy_data import write_image_folder

IMAGES = 16  # pool size 5: three subsets of 6, 5 and 5 images
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("streamed") / "parts"
    write_image_folder(root, IMAGES, image_size=56)
    return root


def _model(tiny_clip_path: Path, tiny_prompt_path: Path, **arguments: object) -> AnomalyCLIP:
    mutual = {"enabled": True, "pool_size": 5, **arguments}
    return AnomalyCLIP(pretrained=str(tiny_clip_path), image_size=56, prompt_weights=str(tiny_prompt_path),
                       mutual=mutual)  # fmt: skip


def _loader(folder: Path) -> DataLoader:
    dataset = ImageFolderDataset(sorted(folder.glob("*.png"))[::-1])  # the loader's order does not matter
    return DataLoader(dataset, batch_size=4, collate_fn=dataset.collate_fn)


def _streamed(model: AnomalyCLIP, folder: Path, root: Path) -> tuple[torch.Tensor, ...]:
    settings = PoolSettings(progress=False, state_root=root)
    scores = score_pools(model.model, model.pre_processor.transform, CPU, _loader(folder), settings)
    result = scores.lookup([str(path) for path in sorted(folder.glob("*.png"))], CPU)
    return result.pred_score, result.anomaly_map


def _in_memory(model: AnomalyCLIP, folder: Path) -> tuple[torch.Tensor, ...]:
    """Today's reference: the whole pool encoded, held and scored at once (AnomalyCLIPModel.score_pool)."""
    dataset = ImageFolderDataset(sorted(folder.glob("*.png")))
    batches = DataLoader(dataset, batch_size=4, collate_fn=dataset.collate_fn)
    members = [model.model.encode_pool_member(model.pre_processor.transform(batch.image)) for batch in batches]
    result = model.model.score_pool(members)
    return result.pred_score, result.anomaly_map


@pytest.mark.parametrize(("fusion", "rscin_k"), [("mean", (1, 2, 3)), ("mutual", None)])
def test_streamed_subsets_give_the_in_memory_scores_and_maps(
    folder: Path, tiny_clip_path: Path, tiny_prompt_path: Path, tmp_path: Path, fusion: str, rscin_k: object
) -> None:
    model = _model(tiny_clip_path, tiny_prompt_path, rscin_k=rscin_k, fusion=fusion)
    scores, maps = _streamed(model, folder, tmp_path)
    reference_scores, reference_maps = _in_memory(model, folder)
    assert maps.shape == reference_maps.shape == (IMAGES, 1, 56, 56)
    assert torch.allclose(scores, reference_scores, atol=1e-6, rtol=0)
    assert torch.allclose(maps, reference_maps, atol=1e-6, rtol=0)
    assert scores.std() > 0.01  # the pool's images are told apart


def test_an_interrupted_run_resumes_with_the_unfinished_subsets_only(
    folder: Path, tiny_clip_path: Path, tiny_prompt_path: Path, tmp_path: Path
) -> None:
    model = _model(tiny_clip_path, tiny_prompt_path)
    save = PoolState.save_subset
    saved: list[int] = []

    def crash_after_one(self: PoolState, index: int, *args: object) -> None:
        if saved:
            raise KeyboardInterrupt
        save(self, index, *args)
        saved.append(index)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PoolState, "save_subset", crash_after_one)
        with pytest.raises(KeyboardInterrupt):
            _streamed(model, folder, tmp_path)
    with counting_encoder() as encoded:
        scores, maps = _streamed(model, folder, tmp_path)
    assert sum(encoded) == IMAGES - 6  # the first subset (6 images) was not encoded again
    reference_scores, reference_maps = _in_memory(model, folder)
    assert torch.allclose(scores, reference_scores, atol=1e-6, rtol=0)
    assert torch.allclose(maps, reference_maps, atol=1e-6, rtol=0)
    with counting_encoder() as encoded:  # all finished: a third run encodes nothing
        _streamed(model, folder, tmp_path)
    assert encoded == []


def test_state_of_other_settings_is_not_used_and_left_alone(
    folder: Path, tiny_clip_path: Path, tiny_prompt_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _streamed(_model(tiny_clip_path, tiny_prompt_path), folder, tmp_path)
    (old,) = tmp_path.iterdir()
    before = sorted(path.name for path in old.iterdir())
    with counting_encoder() as encoded, caplog.at_level(logging.WARNING):
        _streamed(_model(tiny_clip_path, tiny_prompt_path, pool_size=8), folder, tmp_path)
    assert sum(encoded) == IMAGES
    assert f"{old} holds state of these {IMAGES} images from other settings; it is not used" in caplog.text
    assert sorted(path.name for path in old.iterdir()) == before
    assert len(list(tmp_path.iterdir())) == 2


def test_a_state_folder_of_other_settings_is_refused_and_kept(
    folder: Path, tiny_clip_path: Path, tiny_prompt_path: Path, tmp_path: Path
) -> None:
    model = _model(tiny_clip_path, tiny_prompt_path)
    _streamed(model, folder, tmp_path)
    (state,) = tmp_path.iterdir()
    manifest = state / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"format": 1', '"format": 0'))
    written = manifest.read_text()
    with pytest.raises(PoolStateError, match=r"was written for other images or settings .* Remove that folder"):
        _streamed(model, folder, tmp_path)
    assert manifest.read_text() == written


def test_a_pool_below_the_minimum_is_refused_before_anything_is_encoded(
    tiny_clip_path: Path, tiny_prompt_path: Path, tmp_path: Path
) -> None:
    small = tmp_path / "small"
    write_image_folder(small, 4, image_size=56)
    message = r"needs at least 5 images per pool .* are 4\. Score more images"
    with counting_encoder() as encoded, pytest.raises(MutualPoolError, match=message):
        _streamed(_model(tiny_clip_path, tiny_prompt_path), small, tmp_path / "state")
    assert encoded == []
    assert not (tmp_path / "state").exists()


def test_subsets_are_shared_out_by_image_count_the_same_way_in_every_process() -> None:
    sizes = [200, 200, 200, 7, 7, 150]
    owners = assign_subsets(sizes, 2)
    assert owners == assign_subsets(sizes, 2)
    load = [sum(size for size, owner in zip(sizes, owners, strict=True) if owner == rank) for rank in (0, 1)]
    assert sorted(load) == [364, 400]
    assert assign_subsets(sizes, 1) == [0] * len(sizes)

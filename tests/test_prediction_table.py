"""The prediction table of a run with several processes: the ranks' rows merged into one."""

from __future__ import annotations

import pytest
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DistributedSampler

from anomalib_anomalyclip.integration.callbacks import merge_rank_rows

PATHS = [f"/images/{index:02d}.png" for index in range(13)]


def _rank_rows(sampler_type: type, world_size: int, batch_size: int) -> list[list[list[str]]]:
    """Each rank's rows, batch by batch, as the sampler hands the 13 images out (no shuffling)."""
    parts = []
    for rank in range(world_size):
        indices = list(sampler_type(PATHS, num_replicas=world_size, rank=rank, shuffle=False))
        batches = [indices[start : start + batch_size] for start in range(0, len(indices), batch_size)]
        parts.append([[PATHS[index], f"{index / 100:.6f}", "normal"] for batch in batches for index in batch])
    return parts


@pytest.mark.parametrize("sampler_type", [DistributedSampler, UnrepeatedDistributedSampler])
@pytest.mark.parametrize(("world_size", "batch_size"), [(2, 1), (2, 4), (3, 2), (4, 32)])
def test_each_image_once_in_the_dataset_order(sampler_type: type, world_size: int, batch_size: int) -> None:
    parts = _rank_rows(sampler_type, world_size, batch_size)
    if sampler_type is DistributedSampler:  # it pads: some images are predicted twice
        assert sum(len(part) for part in parts) > len(PATHS)
    merged = merge_rank_rows(parts)
    assert merged == [[path, f"{index / 100:.6f}", "normal"] for index, path in enumerate(PATHS)]


def test_rows_without_a_path_are_all_kept() -> None:
    parts = [[["", "0.100000", "normal"], ["/a.png", "0.2", "normal"]], [["", "0.300000", "anomalous"]]]
    assert merge_rank_rows(parts) == [
        ["", "0.100000", "normal"],
        ["", "0.300000", "anomalous"],
        ["/a.png", "0.2", "normal"],
    ]

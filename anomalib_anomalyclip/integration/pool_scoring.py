"""Mutual scoring of a run's images, streamed: one subset in memory at a time, resumable, split over processes.

With ``mutual`` on, :class:`~anomalib_anomalyclip.AnomalyCLIP` calls :func:`score_pools` when a validation,
test or predict loop starts (after its prompts and references are ready); the steps then look their images up
(:meth:`PoolScores.lookup`) instead of running the encoder.

Pools: one per category when the dataset holds several (a ``category`` column, as in
:class:`~anomalib_anomalyclip.data.AuxiliaryDataModule`), one per folder for images to predict on
(``anomalib predict --data <folder>``, :class:`~anomalib_anomalyclip.data.PredictFolder`), else one for the loop.
The pools and their subsets follow from the image paths alone (sorted paths, :func:`~.mutual.split_pool`'s seeded
split into subsets of at most ``mutual.pool_size``), so the run is planned before any image is read: a pool smaller
than the minimum (5 images at ``mutual.fraction=0.3``) stops it with :class:`MutualPoolError` at once.

Order of work, per subset: its images are encoded (:meth:`.AnomalyCLIPModel.encode_pool_member`, one pass per image)
and scored against each other (LNAMD + MSM, :func:`~.mutual.mutual_patch_scores`); its tokens are then released, and
what is kept is written to the pool's state folder (:mod:`.pool_state`): per image the prompt map and the mutual
patch scores at token-grid resolution, per subset a few numbers per image. When all subsets of a pool are scored,
RsCIN runs over the whole pool and the prompts' and mutual terms are min-max scaled by their ranges over the whole
pool, exactly as :meth:`.AnomalyCLIPModel.score_pool` does with the pool in memory; a step's lookup rebuilds an
image's full-resolution maps from its file. Memory thus holds one subset's tokens and maps plus a few numbers per
image of the run; the disk holds about one prompt map per image until the state is removed.

Resume: the state folder is keyed by the pool's files and the scores' settings; a run of the same images with the
same prompts and settings (a rerun after a crash or Ctrl-C, or ``Engine.test``'s test loop after its validation
loop on the same images) encodes only the subsets not finished yet.

Several processes (DDP): every process plans the same subsets; each encodes and scores its own (the largest first,
each to the process with the fewest images so far), writes them to the shared state folder, waits for the others
(a barrier; the cache root must be a folder all processes see), and then reads every subset's summary: no process
receives another's tokens.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
import torch.distributed as dist
from anomalib.data import InferenceBatch, PredictDataset
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from anomalib_anomalyclip.data.predict import ImageFolderDataset
from anomalib_anomalyclip.integration.callbacks import loaders_of
from anomalib_anomalyclip.integration.pool_state import PoolState, SubsetSummary, file_stamps, prune
from anomalib_anomalyclip.method.mutual import (
    MutualFusion,
    MutualScoring,
    MutualScoringError,
    fuse,
    mutual_patch_scores,
    rscin,
    split_pool,
    upsample_maps,
    value_range,
)
from anomalib_anomalyclip.method.pooled_model import EncodedBatch

__all__ = [
    "MutualPoolError",
    "PoolEncoder",
    "PoolScores",
    "PoolSettings",
    "PooledLoops",
    "assign_subsets",
    "pool_keys",
    "score_pools",
]

logger = logging.getLogger(__name__)

Transform = Callable[[torch.Tensor], torch.Tensor]


class MutualPoolError(MutualScoringError):
    """A pool of images is too small for mutual scoring, or an image was not in the run's pools."""


class PoolEncoder(Protocol):
    """What mutual scoring of a run needs of a model: the eager torch model, or an exported graph's runner.

    Attributes:
        mutual: the mutual-scoring settings (``None``: the model does no mutual scoring).
    """

    mutual: MutualScoring | None

    def encode_pool_member(self, images: torch.Tensor) -> EncodedBatch:
        """The prompts' scores and maps and the mutual tokens of a batch (after the run's transform)."""

    def token_grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """Patch grid (rows, columns) of the tokens of images whose maps have ``size``."""

    def pool_fingerprint(self) -> dict[str, Any]:
        """What the encoded outputs depend on besides the images (weights, prompts, settings), as plain values."""


@dataclass(frozen=True)
class PoolSettings:
    """What mutual scoring of a run needs besides the model, the transform and the device.

    Attributes:
        references: the few-shot reference images in the model's bank (part of what the scores depend on).
        progress: show a progress bar.
        state_root: folder of the pools' state folders; ``None``: ``<cache root>/mutual``.
    """

    references: tuple[str, ...] = ()
    progress: bool = True
    state_root: Path | None = None


class _Image(NamedTuple):
    """An image of the run: its path, and where its loader's dataset holds it."""

    path: str
    dataset: Dataset
    index: int
    loader: DataLoader


@dataclass
class _Pool:
    """A pool's images (sorted by path), its subsets (positions in that order) and its state folder."""

    key: str
    images: list[_Image]
    subsets: list[torch.Tensor]
    state: PoolState


@dataclass
class _Lookup:
    """Where an image's result lies: its pool's state, subset and row, its fused score, the pool's map ranges."""

    state: PoolState
    subset: int
    row: int
    score: torch.Tensor
    map_ranges: torch.Tensor
    fusion: MutualFusion


@dataclass
class PoolScores:
    """Scores of a run's images (in memory) and where their maps lie (in the pools' state folders), by image path."""

    entries: dict[str, _Lookup] = field(default_factory=dict)
    states: list[PoolState] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, paths: Sequence[str], device: torch.device) -> InferenceBatch:
        """The fused scores (B,) and maps (B, 1, H, W) of ``paths``, on ``device``."""
        missing = [str(path) for path in paths if str(path) not in self.entries]
        if missing:
            raise MutualPoolError(f"{missing[0]} was not among the images scored mutually at the start of the loop.")
        entries = [self.entries[str(path)] for path in paths]
        maps = torch.stack([_fused_map(entry) for entry in entries])
        scores = torch.stack([entry.score for entry in entries])
        return InferenceBatch(pred_score=scores.to(device), anomaly_map=maps.to(device))

    def discard(self) -> None:
        """Remove the pools' state folders (the scores in memory stay; maps can no longer be looked up)."""
        for state in self.states:
            state.discard()
        logger.info("Mutual scoring: removed the state of %d pool(s).", len(self.states))


class PooledLoops:
    """For an anomalib model that scores mutually: pools scored when a loop starts, looked up by its steps.

    Mixed into :class:`~anomalib_anomalyclip.AnomalyCLIP` and
    :class:`~anomalib_anomalyclip.integration.exported_model.ExportedAnomalyCLIP` (a ``LightningModule``).
    """

    pool_scores: PoolScores | None = None

    def score_loop_pools(
        self, encoder: PoolEncoder, transform: Transform | None, dataloaders: Any, references: Sequence[str] = ()
    ) -> None:
        """Score every image of the loop's ``dataloaders`` against its pool (:func:`score_pools`), on this device."""
        trainer = self._trainer
        progress = trainer is None or trainer.progress_bar_callback is not None
        settings = PoolSettings(tuple(references), progress)
        self.pool_scores = score_pools(encoder, transform, self.device, dataloaders, settings)

    def pooled(self, batch: Any) -> InferenceBatch:
        """The fused scores and maps of the batch's images, looked up by path."""
        return self.pool_scores.lookup(batch.image_path, self.device)

    def discard_pool_state(self) -> None:
        """Remove the pools' state once every process has looked its images up (by the first process)."""
        if self.pool_scores is None:
            return
        self.trainer.strategy.barrier()
        if self.trainer.is_global_zero:
            self.pool_scores.discard()
        self.pool_scores = None


def score_pools(
    model: PoolEncoder,
    transform: Transform | None,
    device: torch.device,
    dataloaders: Any,
    settings: PoolSettings,
) -> PoolScores:
    """Score every image of ``dataloaders`` against its pool, one subset at a time (see the module's description).

    Args:
        model: the torch model (mutual scoring switched on, prompts and few-shot references ready), or an exported
            graph's runner (:class:`.exported_model.ExportedGraph`).
        transform: the pre-processor's transform (resize, CLIP normalisation), applied on ``device``; ``None``: none.
        device: where images are encoded and subsets scored.
        dataloaders: the loop's dataloader(s), as the trainer holds them (their datasets list the images).
        settings: references, progress bar, state folder.

    Returns:
        The scores of every image of the run, with where its maps lie.

    Raises:
        MutualPoolError: a pool holds fewer images than mutual scoring needs, or a dataset does not list its images.
    """
    config = _config(model)
    prune(settings.state_root)
    description = _scoring_description(model, transform, settings)

    def open_state(images: list[_Image], augmentations: str) -> PoolState:
        paths = [image.path for image in images]
        return PoolState.for_pool(paths, {**description, "augmentations": augmentations}, settings.state_root)

    pools = _plan(dataloaders, config, open_state)
    work = [(pool, index) for pool in pools for index in range(len(pool.subsets))]
    world_size, rank = _world()
    owners = assign_subsets([len(pool.subsets[index]) for pool, index in work], world_size)
    own = [item for item, owner in zip(work, owners, strict=True) if owner == rank]
    for pool in pools:
        finished = sum(pool.state.is_finished(index) for index in range(len(pool.subsets)))
        logger.info(
            "Mutual scoring: pool %s: %d images in %d subset(s) of at most %d, %d scored earlier; state in %s",
            pool.key or "of the run", len(pool.images), len(pool.subsets), max(map(len, pool.subsets)), finished,
            pool.state.folder,
        )  # fmt: skip
    _score_subsets(model, transform, device, own, settings.progress)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    scores = PoolScores(states=[pool.state for pool in pools])
    for pool in pools:
        _finish_pool(pool, config, scores)
    return scores


def assign_subsets(sizes: Sequence[int], world_size: int) -> list[int]:
    """The process that scores each subset: largest subsets first, each to the process with fewest images so far.

    Args:
        sizes: images per subset, in the run's order of subsets.
        world_size: number of processes.

    Returns:
        The owning process of each subset (the same list in every process).
    """
    load = [0] * world_size
    owners = [0] * len(sizes)
    for position in sorted(range(len(sizes)), key=lambda item: (-sizes[item], item)):
        owner = min(range(world_size), key=lambda process: (load[process], process))
        owners[position] = owner
        load[owner] += sizes[position]
    return owners


def pool_keys(dataset: object, paths: Sequence[str]) -> list[str]:
    """The pool of each image: its category, its folder (images to predict on), or one pool for the dataset."""
    samples = getattr(dataset, "samples", None)
    if samples is not None and "category" in getattr(samples, "columns", ()) and samples["category"].nunique() > 1:
        category = dict(zip(samples["image_path"].astype(str), samples["category"].astype(str), strict=True))
        return [category.get(path, "") for path in paths]
    if isinstance(dataset, PredictDataset | ImageFolderDataset):
        return [str(Path(path).parent) for path in paths]
    return ["" for _ in paths]


def _config(model: PoolEncoder) -> MutualScoring:
    if model.mutual is None:
        raise RuntimeError("This model does no mutual scoring; give it a configuration with use_mutual_scoring().")
    return model.mutual


def _world() -> tuple[int, int]:
    """(world size, rank): ``(1, 0)`` without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _plan(dataloaders: Any, config: MutualScoring, open_state: Callable[[list[_Image], str], PoolState]) -> list[_Pool]:
    """The run's pools, each with its images sorted by path, its subsets and its state; sizes checked first."""
    images: dict[str, _Image] = {}
    keys: dict[str, str] = {}
    augmentations: dict[str, str] = {}
    for loader in loaders_of(dataloaders):
        dataset = loader.dataset
        paths = _dataset_paths(dataset)
        if paths is None:
            raise MutualPoolError(
                f"Mutual scoring needs a dataset that lists its image files; {type(dataset).__name__} does not "
                "(anomalib's datasets, PredictDataset and PredictFolder do)."
            )
        for index, (path, key) in enumerate(zip(paths, pool_keys(dataset, paths), strict=True)):
            if path not in images:
                images[path] = _Image(path, dataset, index, loader)
                keys[path] = key
                augmentations[key] = repr(getattr(dataset, "augmentations", None))
    by_pool: dict[str, list[_Image]] = defaultdict(list)
    for path in sorted(images):
        by_pool[keys[path]].append(images[path])
    for key, members in by_pool.items():
        _check_pool_size(config, key, len(members))
    return [
        _Pool(key, members, split_pool(len(members), config.pool_size, config.seed, config.min_pool),
              open_state(members, augmentations[key]))
        for key, members in by_pool.items()
    ]  # fmt: skip


def _score_subsets(
    model: PoolEncoder,
    transform: Transform | None,
    device: torch.device,
    work: list[tuple[_Pool, int]],
    progress: bool,
) -> None:
    """Encode and score each unfinished subset of ``work``, writing it to its pool's state as it finishes."""
    encoded = 0
    with tqdm(total=len(work), desc="Mutual scoring", unit="subset", disable=not progress) as bar:
        for pool, index in work:
            if not pool.state.is_finished(index):
                images = [pool.images[position] for position in pool.subsets[index].tolist()]
                _score_subset(model, transform, device, images, pool.state, index)
                encoded += len(images)
            bar.set_postfix(images_encoded=encoded, refresh=False)
            bar.update()
    world_size, rank = _world()
    where = f"process {rank} of {world_size}" if world_size > 1 else "this run"
    logger.info("Mutual scoring: %s encoded %d image(s) in %d subset(s) of its own.", where, encoded, len(work))


def _score_subset(
    model: PoolEncoder,
    transform: Transform | None,
    device: torch.device,
    images: list[_Image],
    state: PoolState,
    index: int,
) -> None:
    """Encode one subset, score its images against each other, write what the pool needs; its tokens go."""
    parts = [_encode(model, transform, device, batch) for batch in _batches(images)]
    tokens = [torch.cat(layer) for layer in zip(*(part.tokens for part in parts), strict=True)]
    prompt_maps = torch.cat([part.anomaly_map for part in parts]).float()
    size = (int(prompt_maps.shape[-2]), int(prompt_maps.shape[-1]))
    patch_scores = mutual_patch_scores(tokens, model.token_grid(size), _config(model))
    del tokens
    mutual_maps = upsample_maps(patch_scores, size)
    summary = SubsetSummary(
        paths=[image.path for image in images],
        prompt_scores=torch.cat([part.pred_score for part in parts]).float().cpu(),
        mutual_scores=mutual_maps.flatten(1).amax(dim=1).cpu(),
        class_embeddings=torch.cat([part.class_embedding for part in parts]).float().cpu(),
        prompt_map_range=value_range(prompt_maps).cpu(),
        mutual_map_range=value_range(mutual_maps).cpu(),
    )
    state.save_subset(index, summary, prompt_maps, patch_scores)


def _batches(images: list[_Image]) -> DataLoader:
    """The subset's images in batches, loaded as their loader loads them (batch size, workers, collation)."""
    loader = images[0].loader
    subset = _Items([(image.dataset, image.index) for image in images])
    batch_size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", None) or 1
    return _checked(
        DataLoader(subset, batch_size=batch_size, num_workers=loader.num_workers, collate_fn=loader.collate_fn),
        [image.path for image in images],
    )


class _Items(Dataset):
    """Items of datasets, by (dataset, index)."""

    def __init__(self, items: list[tuple[Dataset, int]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int) -> Any:
        dataset, index = self.items[position]
        return dataset[index]


def _checked(batches: DataLoader, paths: list[str]) -> Any:
    """``batches``, checking that they hold the images of ``paths`` in that order."""
    start = 0
    for batch in batches:
        found = [str(path) for path in batch.image_path]
        if found != paths[start : start + len(found)]:
            raise MutualPoolError(f"The dataset gave {found[0]} where {paths[start]} was expected.")
        start += len(found)
        yield batch


def _encode(model: PoolEncoder, transform: Transform | None, device: torch.device, batch: Any) -> EncodedBatch:
    images = batch.image.to(device)
    if transform is not None:
        images = transform(images)
    return model.encode_pool_member(images)


def _finish_pool(pool: _Pool, config: MutualScoring, scores: PoolScores) -> None:
    """RsCIN and the pool-wide scaling over every subset's summary; the pool's images go into ``scores``."""
    summaries = [pool.state.finished(index) for index in range(len(pool.subsets))]
    if any(summary is None for summary in summaries):
        raise MutualPoolError(f"Mutual scoring: a subset of pool {pool.key!r} was not scored ({pool.state.folder}).")
    count = len(pool.images)
    prompt_scores, mutual_scores = torch.empty(count), torch.empty(count)
    embeddings = torch.empty(count, summaries[0].class_embeddings.shape[1])
    for subset, summary in zip(pool.subsets, summaries, strict=True):
        prompt_scores[subset] = summary.prompt_scores
        mutual_scores[subset] = summary.mutual_scores
        embeddings[subset] = summary.class_embeddings
    if config.rscin_k:
        mutual_scores = rscin(mutual_scores, embeddings, config.rscin_k)
    fused = fuse(prompt_scores, mutual_scores, config.fusion)
    map_ranges = torch.stack([_joined_range([s.prompt_map_range for s in summaries]),
                              _joined_range([s.mutual_map_range for s in summaries])])  # fmt: skip
    for index, subset in enumerate(pool.subsets):
        for row, position in enumerate(subset.tolist()):
            lookup = _Lookup(pool.state, index, row, fused[position], map_ranges, config.fusion)
            scores.entries[pool.images[position].path] = lookup


def _joined_range(ranges: list[torch.Tensor]) -> torch.Tensor:
    """The (2,) range covering every (2,) range of ``ranges``."""
    stacked = torch.stack(ranges)
    return torch.stack([stacked[:, 0].min(), stacked[:, 1].max()])


def _fused_map(entry: _Lookup) -> torch.Tensor:
    """An image's fused map (1, H, W), rebuilt from its prompt map and mutual patch scores."""
    prompt_map, patch_scores = entry.state.image_maps(entry.subset, entry.row)
    mutual_map = upsample_maps(patch_scores.unsqueeze(0), tuple(prompt_map.shape[-2:]))[0]
    return fuse(prompt_map, mutual_map, entry.fusion, entry.map_ranges)


def _scoring_description(model: PoolEncoder, transform: Transform | None, settings: PoolSettings) -> dict[str, Any]:
    """What the scores depend on besides the images (the key of the pools' state, see :mod:`.pool_state`)."""
    return {
        **model.pool_fingerprint(),
        "references": file_stamps(settings.references),
        "mutual": asdict(_config(model)),
        "transform": repr(transform),
    }


def _dataset_paths(dataset: object) -> list[str] | None:
    """The image files of an anomalib dataset, a ``PredictDataset`` or an ``ImageFolderDataset``; else ``None``."""
    samples = getattr(dataset, "samples", None)
    if samples is not None and "image_path" in getattr(samples, "columns", ()):
        return [str(path) for path in samples["image_path"]]
    for attribute in ("image_filenames", "paths"):
        paths = getattr(dataset, attribute, None)
        if paths is not None:
            return [str(path) for path in paths]
    return None


def _check_pool_size(config: MutualScoring, key: str, size: int) -> None:
    if size >= config.min_pool:
        return
    where = f"the images of {key}" if key else "the images of this run"
    raise MutualPoolError(
        f"Mutual scoring scores each image against the other images of its pool, and needs at least {config.min_pool} "
        f"images per pool (mutual.fraction={config.fraction}); {where} are {size}. Score more images at once (a "
        "folder or datamodule with more images), or switch it off with --model.mutual false to score each "
        "image on its own."
    )

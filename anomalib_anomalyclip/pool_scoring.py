"""Mutual scoring in a Lightning run: the run's images are encoded once, pooled, and scored against each other.

With ``mutual`` on, :class:`~anomalib_anomalyclip.AnomalyCLIP` calls :func:`score_run` when a validation,
test or predict loop starts (after its prompts and references are ready): every image of the loop's dataloaders
goes through the encoder once (:meth:`.AnomalyCLIPModel.encode_pool_member`), the images are grouped into pools,
each pool is scored (:meth:`.AnomalyCLIPModel.score_pool`), and the steps then look their images up by path
instead of running the encoder again.

Pools: one per category when the dataset holds several (a ``category`` column, as in
:class:`~anomalib_anomalyclip.data.AuxiliaryDataModule`), one per folder for images to predict on
(``anomalib predict --data <folder>``, :class:`~anomalib_anomalyclip.data.PredictFolder`), else one for the loop.
Images of a pool are ordered by path, so subsets (``mutual.pool_size``) do not depend on the loader's order. A
pool smaller than the minimum (5 images at ``mutual.fraction=0.3``) stops the run with :class:`MutualPoolError`.
Under DDP every process gathers the encoded images of all processes, so each image is scored against the whole
pool; each process then looks up its own images.

A loop over the same image files as the previous loop, with the same prompts, references and settings, reuses the
previous loop's scores (:func:`run_signature`): ``Engine.test`` of a zero-shot model validates on the test images
first, and the encoder still runs once per image.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Hashable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from anomalib.data import InferenceBatch, PredictDataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .callbacks import loaders_of
from .data.predict import ImageFolderDataset
from .mutual import MutualScoringError
from .torch_model import PoolMember

if TYPE_CHECKING:
    from .lightning_model import AnomalyCLIP

__all__ = ["MutualPoolError", "PoolScores", "pool_keys", "run_signature", "score_run"]

logger = logging.getLogger(__name__)


class MutualPoolError(MutualScoringError):
    """A pool of images is too small for mutual scoring, or an image was not in the run's pools."""


class PoolScores:
    """Scores and maps of a run's images, by image path.

    Args:
        signature: what the scores depend on (:func:`run_signature`); ``None``: unknown, never reused.
    """

    def __init__(self, signature: Hashable | None = None) -> None:
        self._by_path: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.signature = signature

    def __len__(self) -> int:
        return len(self._by_path)

    def add(self, paths: Sequence[str], scored: InferenceBatch) -> None:
        """Keep the scores and maps of ``paths`` (in the order of ``scored``)."""
        for index, path in enumerate(paths):
            self._by_path[str(path)] = (scored.pred_score[index], scored.anomaly_map[index])

    def lookup(self, paths: Sequence[str], device: torch.device) -> InferenceBatch:
        """The scores (B,) and maps (B, 1, H, W) of ``paths``, on ``device``."""
        missing = [str(path) for path in paths if str(path) not in self._by_path]
        if missing:
            raise MutualPoolError(f"{missing[0]} was not among the images scored mutually at the start of the loop.")
        scores, maps = zip(*(self._by_path[str(path)] for path in paths), strict=True)
        return InferenceBatch(pred_score=torch.stack(scores).to(device), anomaly_map=torch.stack(maps).to(device))


def score_run(module: AnomalyCLIP, dataloaders: Any, previous: PoolScores | None = None) -> PoolScores:
    """Encode every image of ``dataloaders`` once, pool them, and score each pool mutually.

    Args:
        module: the AnomalyCLIP module (its pre-processor and torch model; mutual scoring switched on).
        dataloaders: the loop's dataloader(s), as the trainer holds them.
        previous: the scores of the previous loop, returned as they are when nothing they depend on changed.

    Returns:
        The scores and maps of every image of the run (all processes' images under DDP).

    Raises:
        MutualPoolError: a pool holds fewer images than mutual scoring needs.
    """
    signature = run_signature(module, dataloaders)
    if previous is not None and signature is not None and previous.signature == signature:
        logger.info("Mutual scoring: the %d images of this loop were scored in the previous one.", len(previous))
        return previous
    paths: list[str] = []
    keys: list[str] = []
    members: list[PoolMember] = []
    for loader in loaders_of(dataloaders):
        description = "Encoding the images of the pool"
        for batch in tqdm(_own_iteration(loader), desc=description, leave=False, disable=_quiet(module)):
            batch_paths = [str(path) for path in batch.image_path]
            members.extend(_split(_encode(module, batch.image), len(batch_paths)))
            paths.extend(batch_paths)
            keys.extend(pool_keys(loader.dataset, batch_paths))
    paths, keys, members = _gathered(paths, keys, members)
    scores = PoolScores(signature)
    for key, indices in _pools(paths, keys).items():
        pool = [members[index] for index in indices]
        _check_pool_size(module, key, len(pool))
        scores.add([paths[index] for index in indices], module.model.score_pool(pool))
    return scores


def pool_keys(dataset: object, paths: Sequence[str]) -> list[str]:
    """The pool of each image: its category, its folder (images to predict on), or one pool for the dataset."""
    samples = getattr(dataset, "samples", None)
    if samples is not None and "category" in getattr(samples, "columns", ()) and samples["category"].nunique() > 1:
        category = dict(zip(samples["image_path"].astype(str), samples["category"].astype(str), strict=True))
        return [category.get(path, "") for path in paths]
    if isinstance(dataset, PredictDataset | ImageFolderDataset):
        return [str(Path(path).parent) for path in paths]
    return ["" for _ in paths]


def run_signature(module: AnomalyCLIP, dataloaders: Any) -> Hashable | None:
    """What the scores of a loop depend on: its image files and the model's scoring state.

    The files are each loader's dataset's image paths with their sizes and modification times (and the dataset's
    augmentations); the state is a digest of the prompts' text features, the few-shot references, the mutual
    scoring settings and the fusion. ``None`` when a dataset does not list its images.
    """
    files = []
    for loader in loaders_of(dataloaders):
        paths = _dataset_paths(loader.dataset)
        if paths is None:
            return None
        stamps = tuple(sorted(_file_stamp(path) for path in paths))
        files.append((repr(getattr(loader.dataset, "augmentations", None)), stamps))
    if not files:
        return None
    text_features = module.model.inference_text_features().detach().float().cpu().contiguous()
    digest = hashlib.sha256(text_features.numpy().tobytes()).hexdigest()
    state = (digest, tuple(module.references), module.model.mutual)
    return tuple(files), state


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


def _file_stamp(path: str) -> tuple[str, int, int]:
    try:
        stat = Path(path).stat()
    except OSError:
        return path, -1, -1
    return path, stat.st_size, stat.st_mtime_ns


def _own_iteration(loader: DataLoader) -> DataLoader:
    """A loader over the same batches as ``loader`` whose iteration leaves the loop's own iteration alone.

    Lightning's predict loop wraps a loader's batch sampler (``_IndexBatchSamplerWrapper``, which records the indices
    of each batch) in an object that is its own iterator: a second iteration of the loader would take the batches
    of the loop's iteration, and the loop would then predict nothing. The wrapped batch sampler (under DDP, with its
    ``DistributedSampler``) is iterated on its own instead.
    """
    wrapped = getattr(loader.batch_sampler, "_batch_sampler", None)
    if wrapped is None:
        return loader
    workers = loader.num_workers
    return DataLoader(loader.dataset, batch_sampler=wrapped, num_workers=workers, collate_fn=loader.collate_fn)


def _quiet(module: AnomalyCLIP) -> bool:
    """No progress bar where the trainer shows none (``enable_progress_bar=False``)."""
    trainer = getattr(module, "_trainer", None)
    return trainer is not None and trainer.progress_bar_callback is None


def _encode(module: AnomalyCLIP, images: torch.Tensor) -> PoolMember:
    images = images.to(module.device)
    if module.pre_processor is not None:
        images = module.pre_processor.transform(images)
    member = module.model.encode_pool_member(images)
    return PoolMember(*(_to_cpu(value) for value in member))


def _to_cpu(value: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    return [tensor.cpu() for tensor in value] if isinstance(value, list) else value.cpu()


def _split(member: PoolMember, count: int) -> Iterator[PoolMember]:
    """One member per image of a batch."""
    for index in range(count):
        one = slice(index, index + 1)
        yield PoolMember(
            member.pred_score[one], member.anomaly_map[one], [layer[one] for layer in member.tokens],
            member.class_embedding[one],
        )  # fmt: skip


def _pools(paths: Sequence[str], keys: Sequence[str]) -> dict[str, list[int]]:
    """Indices of each pool's images, ordered by path; an image seen twice (DDP padding) counts once."""
    first: dict[str, int] = {}
    for index, path in enumerate(paths):
        first.setdefault(path, index)
    pools: dict[str, list[int]] = defaultdict(list)
    for path in sorted(first):
        pools[keys[first[path]]].append(first[path])
    return dict(pools)


def _check_pool_size(module: AnomalyCLIP, key: str, size: int) -> None:
    minimum = module.model.mutual.min_pool
    if size >= minimum:
        return
    where = f"the images of {key}" if key else "the images of this run"
    raise MutualPoolError(
        f"Mutual scoring scores each image against the other images of its pool, and needs at least {minimum} "
        f"images per pool (mutual.fraction={module.model.mutual.fraction}); {where} are {size}. Score more "
        "images at once (a folder or datamodule with more images), or switch it off with --model.mutual "
        "false to score each image on its own."
    )


def _gathered(
    paths: list[str], keys: list[str], members: list[PoolMember]
) -> tuple[list[str], list[str], list[PoolMember]]:
    """Under DDP, every process's encoded images, in rank order; else the arguments."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return paths, keys, members
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (paths, keys, members))
    return (
        [path for part in gathered for path in part[0]],
        [key for part in gathered for key in part[1]],
        [member for part in gathered for member in part[2]],
    )

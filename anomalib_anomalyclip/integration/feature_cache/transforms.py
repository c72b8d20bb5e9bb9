"""Which training inputs may be cached: those whose image path always yields the same pixels.

Random training augmentations (datamodule or pre-processor) and synthetic anomalies made
anew every epoch (a dataset's ``random_transforms``) make every epoch see new pixels, so
they switch the cache off (the reason is logged by the caller).
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ["DETERMINISTIC_TRANSFORMS", "cacheable_inputs", "nondeterministic_transforms"]

DETERMINISTIC_TRANSFORMS = frozenset(
    {
        "CenterCrop",
        "Compose",
        "ConvertImageDtype",
        "ExportableCenterCrop",
        "Grayscale",
        "Identity",
        "Normalize",
        "Pad",
        "ReferenceResize",
        "Resize",
        "ToDtype",
        "ToImage",
        "ToPureTensor",
    }
)


def nondeterministic_transforms(transform: object) -> list[str]:
    """Names of the transforms in ``transform`` (walking ``Compose``) not known to be deterministic."""
    names = (type(item).__name__ for item in _walk_transforms(transform))
    return [name for name in names if name not in DETERMINISTIC_TRANSFORMS]


def _walk_transforms(transform: object) -> Iterator[object]:
    if transform is None:
        return
    yield transform
    for child in getattr(transform, "transforms", ()) or ():
        yield from _walk_transforms(child)


def cacheable_inputs(dataset: object, pre_processor: object) -> tuple[list[str], list[object], str]:
    """Image paths and transforms of a dataset, or the reason why its features cannot be cached.

    Args:
        dataset: an anomalib dataset (``samples.image_path``, optional ``augmentations`` and
            ``random_transforms``), or ``None``.
        pre_processor: the module's pre-processor (its ``transform``), or ``None``.

    Returns:
        ``(image paths, transforms, "")``, or ``([], [], reason)`` when caching would be wrong.
    """
    samples = getattr(dataset, "samples", None)
    if samples is None or "image_path" not in getattr(samples, "columns", ()):
        return [], [], "the training dataset does not list its images (no samples.image_path)"
    if pre_processor is not None and not hasattr(pre_processor, "transform"):
        return [], [], f"the pre-processor {type(pre_processor).__name__} does not expose its transform"
    transforms = [getattr(dataset, "augmentations", None), getattr(pre_processor, "transform", None)]
    generators = list(getattr(dataset, "random_transforms", ()))  # e.g. anomalies made anew at every load
    random = [name for transform in transforms + generators for name in nondeterministic_transforms(transform)]
    if random:
        return [], [], f"the training images are augmented ({', '.join(random)}), so every epoch sees new pixels"
    return [str(path) for path in samples["image_path"]], transforms, ""

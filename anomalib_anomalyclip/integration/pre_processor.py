"""Pre-processing as the reference implementation does it, in training, testing and exported graphs.

The reference (zqhang/AnomalyCLIP) reads 8-bit images with PIL and resizes each one on its own, before
batching, to 518 x 518:

* images: PIL bicubic with PIL's antialiasing (support widened by the down-scaling factor, kernel
  ``a = -0.5``), two separable passes (horizontal first) each rounded and clipped to 0..255, then
  ``ToTensor`` (``/ 255``) and CLIP's normalisation;
* masks: binarised (``> 0``) to 0/255, PIL bilinear with antialiasing, ``ToTensor`` and ``> 0.5``.

:class:`ReferenceResize` reproduces both as a torchvision ``Resize`` (so anomalib's datamodules append it to
every dataset's augmentations, see :meth:`anomalib.data.AnomalibDataModule._update_augmentations`: each image
is resized on its own in the dataset, before anomalib's collate could stretch mixed sizes to the largest
one). Images: on CPU torch's 8-bit antialiased bicubic kernel (derived from Pillow's, within one grey level
of PIL when reducing; when enlarging, e.g. 400 x 300 to 518, within two grey levels on under 1 % of the values);
elsewhere, and in exported graphs, the kernel's arithmetic (its 16-bit weights, its rounding) as
two matrix products, with the same results (ONNX and OpenVINO run them as they are, whereas OpenVINO
ignores the ``antialias`` attribute of ONNX's ``Resize``). Masks: PIL itself (its fixed-point rounding
decides the pixels that lie on the 0.5 threshold).

:class:`AnomalyCLIPPreProcessor` is the anomalib pre-processor around it: it keeps the antialiased resize
in its export transform (anomalib's own switches antialiasing off) and stores its settings as plain data in
Lightning checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from enum import Enum
from typing import Any, Literal

import torch
from anomalib.pre_processing import PreProcessor
from torchvision import tv_tensors
from torchvision.transforms.v2 import Compose, InterpolationMode, Normalize, Resize, Transform

from anomalib_anomalyclip.errors import parse_choice
from anomalib_anomalyclip.method.resize import resize_image_like_pil, resize_mask_like_pil

logger = logging.getLogger(__name__)

CONFIG_KEY = "anomalyclip_pre_processing"


PreprocessingName = Literal["reference", "fast"]


class Preprocessing(str, Enum):
    """Pre-processing modes of :class:`~anomalib_anomalyclip.AnomalyCLIP`."""

    REFERENCE = "reference"  # the reference's 8-bit PIL resize (images and masks), per image
    FAST = "fast"  # anomalib's float resize (bicubic, antialiased; masks nearest), no rounding


# --------------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------------


class ReferenceResize(Resize):
    """torchvision ``Resize`` with the reference's 8-bit PIL results: images bicubic, masks bilinear > 0.5.

    A ``Resize`` subclass on purpose: anomalib's datamodules append the model's resize to each dataset's
    augmentations, so every image is resized on its own before batching.

    Args:
        size: (height, width) of the output.
        exportable: always use the matrix-product form (for exported graphs).
    """

    def __init__(self, size: Sequence[int], exportable: bool = False) -> None:
        super().__init__(list(size), interpolation=InterpolationMode.BICUBIC, antialias=True)
        self.exportable = exportable

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Resize one input: masks as the reference's masks, images (and plain tensors) as its images."""
        if isinstance(inpt, tv_tensors.Mask):
            return tv_tensors.wrap(resize_mask_like_pil(inpt.as_subclass(torch.Tensor), self.size), like=inpt)
        if isinstance(inpt, tv_tensors.Image):
            resized = resize_image_like_pil(inpt.as_subclass(torch.Tensor), self.size, self.exportable)
            return tv_tensors.wrap(resized, like=inpt)
        if isinstance(inpt, torch.Tensor) and not isinstance(inpt, tv_tensors.TVTensor):  # also traced tensors
            return resize_image_like_pil(inpt, self.size, self.exportable)
        return super().transform(inpt, params)


def reference_transform(image_size: Sequence[int] | None, exportable: bool = False) -> Transform:
    """The reference's resize and CLIP's normalisation.

    Args:
        image_size: (height, width); ``None``: no resize, each image keeps its own size (tiled inference).
        exportable: the export form of the resize (see :class:`ReferenceResize`).
    """
    if image_size is None:
        return Compose([clip_normalisation()])
    return Compose([ReferenceResize(image_size, exportable=exportable), clip_normalisation()])


def clip_normalisation() -> Normalize:
    """CLIP's (OpenAI's) mean and standard deviation."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    return Normalize(mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD)


class AnomalyCLIPPreProcessor(PreProcessor):
    """anomalib pre-processor with the reference's pre-processing (see the module docstring).

    ``transform`` runs in the Lightning loops (and, through anomalib's datamodules, per image in the
    datasets); ``export_transform`` (used by ``forward``, hence by exported graphs) keeps the antialiased
    resize. Checkpoints store ``{"anomalyclip_pre_processing": {"image_size": [h, w]}}``.

    Args:
        image_size: (height, width) of the model's input; ``None``: no resize (a tiled model at each image's size).
    """

    def __init__(self, image_size: Sequence[int] | None = (518, 518)) -> None:
        super().__init__(transform=reference_transform(image_size))
        self._configure(image_size)

    def _configure(self, image_size: Sequence[int] | None) -> None:
        self.image_size = None if image_size is None else [int(side) for side in image_size]
        self.transform = reference_transform(self.image_size)
        self.export_transform = reference_transform(self.image_size, exportable=True)

    def resize_to(self, image_size: Sequence[int] | None) -> bool:
        """Resize to ``image_size`` from now on (``None``: not at all); returns whether that changed anything."""
        size = None if image_size is None else [int(side) for side in image_size]
        if size == self.image_size:
            return False
        self._configure(size)
        return True

    def checkpoint_config(self) -> dict[str, Any]:
        """Plain data for the checkpoint: the input size, and anomalib's spec of the nearest stock transform.

        The spec (float bicubic resize and CLIP normalisation) is what anomalib's own ``PreProcessor`` restores
        when the checkpoint is loaded into a model built with another pre-processor (``preprocessing=fast``).
        """
        from anomalib.pre_processing.utils.spec import transform_to_spec

        size = None if self.image_size is None else list(self.image_size)
        resize = [] if size is None else [Resize(size, InterpolationMode.BICUBIC, antialias=True)]
        stock = Compose([*resize, clip_normalisation()])
        return {"transform": transform_to_spec(stock), CONFIG_KEY: {"image_size": size}}

    def load_checkpoint_config(self, config: dict[str, Any]) -> None:
        """Restore the input size; a checkpoint of another pre-processor keeps this one (with a log line)."""
        settings = config.get(CONFIG_KEY)
        if settings is None:
            logger.info("The checkpoint holds another pre-processor's settings; keeping the reference pre-processing.")
            return
        self._configure(settings["image_size"])


def clip_pre_processor(
    image_size: Sequence[int] | None = (518, 518), preprocessing: Preprocessing | str = "reference"
) -> PreProcessor:
    """The model's pre-processor: resize to ``image_size`` (bicubic) and CLIP's normalisation.

    Args:
        image_size: (height, width); ``None``: no resize (a tiled model working at each image's own size).
        preprocessing: ``reference`` (:class:`AnomalyCLIPPreProcessor`) or ``fast`` (anomalib's float resize).
    """
    if parse_choice(Preprocessing, preprocessing, "preprocessing") is Preprocessing.REFERENCE:
        return AnomalyCLIPPreProcessor(image_size)
    resize = [] if image_size is None else [Resize(image_size, interpolation=InterpolationMode.BICUBIC, antialias=True)]
    return PreProcessor(transform=Compose([*resize, clip_normalisation()]))


def follow_tiling(module: Any) -> None:
    """Make an AnomalyCLIP module's pre-processor (and its datamodule's datasets) resize to the working resolution.

    ``TilerConfigurationCallback`` sets the torch model's ``tiler`` in its ``setup``, after the datamodule appended
    the model's resize to its datasets; this runs in the module's ``setup`` and redoes that with the working
    resolution. A pre-processor of the user's own is left as it is.
    """
    tiling = module.model.tiling
    if tiling is None:
        return
    size = "each image's own size" if tiling.working_size is None else "x".join(map(str, tiling.working_size))
    logger.info("AnomalyCLIP tiles %s-px tiles every %s px at %s.", tiling.tile_size[0], tiling.stride[0], size)
    pre_processor = module.pre_processor
    if not isinstance(pre_processor, AnomalyCLIPPreProcessor) or not pre_processor.resize_to(tiling.working_size):
        return
    datamodule = module.trainer.datamodule if getattr(module, "_trainer", None) is not None else None
    if hasattr(datamodule, "_update_augmentations"):
        datamodule._update_augmentations()  # anomalib appends the model's resize to every dataset's augmentations

"""Export support: what goes into an exported AnomalyCLIP, and checks with clear messages.

:class:`anomalib_anomalyclip.AnomalyCLIP` exports through anomalib's own
``to_torch``/``to_onnx``/``to_openvino`` (so ``anomalib export`` and ``Engine.export``
work unchanged). While exporting, the module's ``model`` is temporarily the
:class:`~anomalib_anomalyclip.inference_model.AnomalyCLIPInferenceModel`: the visual
encoder with DPAM, the two text embeddings as a buffer and the map smoothing, between
anomalib's pre-processor (resize, CLIP normalisation) and post-processor (normalised
score and map, label and mask). The text encoder and the prompts stay behind.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from anomalib.deploy.export import CompressionType
from lightning_utilities.core.imports import module_available

from .errors import ExportDataError, ExportUnavailableError

if TYPE_CHECKING:
    from anomalib.data import AnomalibDataModule
    from anomalib.models.components import AnomalibModule

# Opset 18 is what torch's dynamo exporter targets natively; lower ones only add a conversion step.
EXPORT_OPSET = 18
INSTALL_HINT = "pip install 'anomalib-anomalyclip[export]'"
NEEDS_DATA = {CompressionType.INT8_PTQ, CompressionType.INT8_ACQ}
NEEDS_NNCF = {CompressionType.INT8, *NEEDS_DATA}


@contextmanager
def inference_model_in_place(module: AnomalibModule) -> Iterator[None]:
    """Let ``module.model`` be its inference model (``module.model.inference_model()``) for the block.

    Args:
        module: an AnomalibModule whose ``model`` has an ``inference_model()`` method.
    """
    full_model = module.model
    module.model = full_model.inference_model()
    try:
        yield
    finally:
        module.model = full_model


def check_openvino_export(
    compression_type: CompressionType | str | None, datamodule: AnomalibDataModule | None
) -> None:
    """Fail early, and say what to do, when an OpenVINO export cannot run.

    Args:
        compression_type: anomalib's compression option (``FP16``, ``INT8``, ``INT8_PTQ``,
            ``INT8_ACQ``) or ``None``.
        datamodule: calibration data for ``INT8_PTQ``/``INT8_ACQ``.

    Raises:
        ExportUnavailableError: OpenVINO or NNCF is not installed.
        ExportDataError: calibration data is missing, or INT8_ACQ's accuracy check would get batches of one
            image (an ``ExportUnavailableError`` and a ``ValueError``).
    """
    if not module_available("openvino"):
        raise ExportUnavailableError(f"OpenVINO export needs the openvino package: {INSTALL_HINT}.")
    compression = CompressionType(compression_type) if compression_type is not None else None
    if compression in NEEDS_NNCF and not module_available("nncf"):
        raise ExportUnavailableError(
            f"OpenVINO {compression.name} compression needs NNCF: {INSTALL_HINT} (or pip install nncf)."
        )
    if compression in NEEDS_DATA and datamodule is None:
        raise ExportDataError(
            f"OpenVINO {compression.name} quantisation calibrates on images from a datamodule: pass one "
            "(CLI: --data MVTecAD --data.root ... --data.category ...; Python: Engine.export(..., datamodule=...)). "
            "Use --compression_type FP16 or INT8 (weights only) to compress without data."
        )
    if compression is CompressionType.INT8_ACQ and getattr(datamodule, "eval_batch_size", 2) < 2:
        # anomalib 2.7's accuracy check squeezes the model's outputs, so a batch of one image no longer matches
        # its labels and the export dies deep inside NNCF with a shape error.
        raise ExportDataError(
            "OpenVINO INT8_ACQ checks the accuracy of the quantised model in batches, and anomalib's check fails "
            "for batches of one image: give the datamodule eval_batch_size >= 2 (CLI: --data.eval_batch_size 8)."
        )

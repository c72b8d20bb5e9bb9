"""Export support: what goes into an exported AnomalyCLIP, and checks with clear messages.

:class:`anomalib_anomalyclip.AnomalyCLIP` exports through anomalib's own
``to_torch``/``to_onnx``/``to_openvino`` (so ``anomalib export`` and ``Engine.export``
work unchanged). While exporting, the module's ``model`` is temporarily the
:class:`~anomalib_anomalyclip.method.inference_model.AnomalyCLIPInferenceModel`: the visual
encoder with DPAM, the two text embeddings as a buffer and the map smoothing, between
anomalib's pre-processor (resize, CLIP normalisation) and post-processor (normalised
score and map, label and mask). The text encoder and the prompts stay behind.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anomalib.deploy.export import CompressionType
from lightning_utilities.core.imports import module_available

from anomalib_anomalyclip.errors import ExportDataError, ExportUnavailableError

if TYPE_CHECKING:
    from anomalib.data import AnomalibDataModule
    from anomalib.models.components import AnomalibModule

# Opset 18 is what torch's dynamo exporter targets natively; lower ones only add a conversion step.
EXPORT_OPSET = 18
INSTALL_HINT = "pip install 'anomalib-anomalyclip[export]'"
NEEDS_DATA = {CompressionType.INT8_PTQ, CompressionType.INT8_ACQ}
NEEDS_NNCF = {CompressionType.INT8, *NEEDS_DATA}


@contextmanager
def inference_model_in_place(
    module: AnomalibModule, traced: bool = False, input_size: tuple[int, int] | None = None
) -> Iterator[None]:
    """Let ``module.model`` be its inference model (``module.model.inference_model()``) for the block.

    Args:
        module: an AnomalibModule whose ``model`` has an ``inference_model()`` method.
        traced: the block traces a graph: a tiled model then needs a fixed working size (see
            :func:`.tiled_model.check_tiled_export`).
        input_size: the graph's fixed input size, if any.
    """
    full_model = module.model
    module.model = full_model.inference_model(input_size, traced)
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


class InferencePathExport:
    """Mixin for an ``AnomalibModule``: ``to_torch``/``to_onnx``/``to_openvino`` export the inference path only.

    The module's :meth:`prepare_export` runs first (it refuses a model that cannot score yet); then anomalib's
    export runs with ``model`` being the inference model (:func:`inference_model_in_place`).
    """

    def prepare_export(self) -> None:
        """Make the model ready to export, or raise saying what is missing (the module provides it)."""
        raise NotImplementedError

    def to_torch(self, export_root: str | Path, model_file_name: str = "model") -> Path:
        """Save the inference path for ``TorchInferencer``."""
        self.prepare_export()
        with inference_model_in_place(self):
            return super().to_torch(export_root, model_file_name)

    def to_onnx(
        self,
        export_root: str | Path,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        **kwargs: Any,
    ) -> Path:
        """One ONNX graph from image to score and map, with the text embeddings baked in (no text encoder).

        Also the first step of ``to_openvino``. Defaults to ONNX opset 18.
        """
        self.prepare_export()
        kwargs.setdefault("opset_version", EXPORT_OPSET)
        with inference_model_in_place(self, traced=True, input_size=input_size):
            return super().to_onnx(export_root, model_file_name, input_size, **kwargs)

    def to_openvino(
        self,
        export_root: str | Path,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        compression_type: CompressionType | None = None,
        datamodule: AnomalibDataModule | None = None,
        **kwargs: Any,
    ) -> Path:
        """OpenVINO export (anomalib's, of the ONNX graph); fails early with a clear message when it cannot run."""
        check_openvino_export(compression_type, datamodule)
        return super().to_openvino(export_root, model_file_name, input_size, compression_type, datamodule, **kwargs)

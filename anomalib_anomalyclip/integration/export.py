"""Export support: what goes into an exported AnomalyCLIP, and checks with clear messages.

:class:`anomalib_anomalyclip.AnomalyCLIP` exports through anomalib's own
``to_torch``/``to_onnx``/``to_openvino`` (so ``anomalib export`` and ``Engine.export``
work unchanged). While exporting, the module's ``model`` is temporarily the
:class:`~anomalib_anomalyclip.method.inference_model.AnomalyCLIPInferenceModel`: the visual
encoder with DPAM, the two text embeddings as a buffer and the map smoothing, between
anomalib's pre-processor (resize, CLIP normalisation) and post-processor (normalised
score and map, label and mask). The text encoder and the prompts stay behind.

A model that scores mutually exports the encoding of one pool member instead
(:class:`~anomalib_anomalyclip.method.pooled_model.PoolMemberInferenceModel`): the graph returns the prompts' score
and map, the mutual blocks' tokens (float16) and CLIP's class embedding, and stops before the post-processor,
because the pool's scores are normalised only after the pool is scored. What scoring the pool then needs (the
mutual-scoring settings, the patch size, the post-processor's thresholds and ranges) is written into the file's
metadata (:data:`POOL_METADATA_KEY`: ONNX ``metadata_props``, which OpenVINO keeps as ``rt_info``); see
:func:`read_pool_metadata` and :class:`.exported_model.ExportedAnomalyCLIP`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anomalib.deploy.export import CompressionType
from lightning_utilities.core.imports import module_available

from anomalib_anomalyclip.errors import ExportDataError, ExportUnavailableError
from anomalib_anomalyclip.integration.post_processor import post_processor_state
from anomalib_anomalyclip.method.pooled_model import PoolMemberInferenceModel

if TYPE_CHECKING:
    from anomalib.data import AnomalibDataModule
    from anomalib.models.components import AnomalibModule

# Opset 18 is what torch's dynamo exporter targets natively; lower ones only add a conversion step.
EXPORT_OPSET = 18
INSTALL_HINT = "pip install 'anomalib-anomalyclip[export]'"
NEEDS_DATA = {CompressionType.INT8_PTQ, CompressionType.INT8_ACQ}
NEEDS_NNCF = {CompressionType.INT8, *NEEDS_DATA}
POOL_METADATA_KEY = "anomalyclip.pool_scoring"
"""Metadata key of an export of a mutual-scoring model (ONNX ``metadata_props``; OpenVINO ``rt_info["framework"]``)."""


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
    full_model, post_processor = module.model, module.post_processor
    module.model = full_model.inference_model(input_size, traced)
    if isinstance(module.model, PoolMemberInferenceModel):
        module.post_processor = None  # applied after the pool is scored (see the module's description)
    try:
        yield
    finally:
        module.model, module.post_processor = full_model, post_processor


def pool_metadata(module: AnomalibModule) -> dict[str, Any] | None:
    """What scoring pools with an export of ``module`` needs besides the graph; ``None`` without mutual scoring.

    Raises:
        ExportUnavailableError: the module's post-processor cannot be rebuilt outside the graph.
    """
    mutual = module.model.mutual
    if mutual is None:
        return None
    try:
        post_processing = post_processor_state(module.post_processor)
    except TypeError as error:
        raise ExportUnavailableError(str(error)) from None
    patch_size = int(module.model.visual_encoder.patch_size[0])
    return {"mutual": asdict(mutual), "patch_size": patch_size, "post_processor": post_processing}


def write_pool_metadata(onnx_path: Path, metadata: dict[str, Any]) -> None:
    """Store ``metadata`` in the ONNX file under :data:`POOL_METADATA_KEY` (OpenVINO's conversion keeps it)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False)  # weights in external files stay where they are
    graph.metadata_props.add(key=POOL_METADATA_KEY, value=json.dumps(metadata))
    onnx.save(graph, str(onnx_path))


def read_pool_metadata(path: Path) -> dict[str, Any] | None:
    """The pool-scoring metadata of an exported ``.xml`` or ``.onnx`` file; ``None`` when it has none."""
    import openvino

    model = openvino.Core().read_model(str(path))
    if not model.has_rt_info(["framework", POOL_METADATA_KEY]):
        return None
    return json.loads(model.get_rt_info(["framework", POOL_METADATA_KEY]).astype(str))


def check_openvino_export(
    compression_type: CompressionType | str | None, datamodule: AnomalibDataModule | None, pooled: bool = False
) -> None:
    """Fail early, and say what to do, when an OpenVINO export cannot run.

    Args:
        compression_type: anomalib's compression option (``FP16``, ``INT8``, ``INT8_PTQ``,
            ``INT8_ACQ``) or ``None``.
        datamodule: calibration data for ``INT8_PTQ``/``INT8_ACQ``.
        pooled: the model scores mutually (its graph returns what the pool needs, not scores to check).

    Raises:
        ExportUnavailableError: OpenVINO or NNCF is not installed, or INT8_ACQ of a model that scores mutually.
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
    if compression is CompressionType.INT8_ACQ and pooled:
        raise ExportUnavailableError(
            "INT8_ACQ checks the accuracy of the scores the graph returns, and the graph of a model that scores "
            "mutually returns what its pool needs instead: use --compression_type INT8 or INT8_PTQ."
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
        if pool_metadata(self) is not None:
            raise ExportUnavailableError(
                "A model that scores mutually exports to OpenVINO or ONNX (--export_type openvino or onnx), whose "
                "files carry what scoring the pools needs; a Torch export would not."
            )
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
        metadata = pool_metadata(self)
        kwargs.setdefault("opset_version", EXPORT_OPSET)
        with inference_model_in_place(self, traced=True, input_size=input_size):
            onnx_path = super().to_onnx(export_root, model_file_name, input_size, **kwargs)
        if metadata is not None:
            write_pool_metadata(onnx_path, metadata)
        return onnx_path

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
        check_openvino_export(compression_type, datamodule, pooled=self.model.mutual is not None)
        return super().to_openvino(export_root, model_file_name, input_size, compression_type, datamodule, **kwargs)

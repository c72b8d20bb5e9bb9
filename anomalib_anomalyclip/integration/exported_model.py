"""Run an exported AnomalyCLIP with anomalib's ``predict`` and ``test``: images in, visualisations and metrics out.

anomalib's CLI takes a model *class* for ``--model``, not a file. This module wraps an
exported file (OpenVINO ``.xml``, ``.onnx`` or Torch ``.pt``, as written by
``anomalib export``) in a small anomalib model that runs it through anomalib's own
inferencers, so that ``anomalib predict`` loads the images, runs the exported graph and
writes its usual visualisations::

    anomalib predict --model ExportedAnomalyCLIP --model.path weights/openvino/model.xml --data images/

The exported graph holds the whole pipeline (resize, normalisation, model,
normalisation of the outputs, thresholds), so this wrapper adds no pre- or
post-processing of its own. Images are fed as read ([0, 1], any size), or resized to
the graph's input size when it was exported with a fixed ``--input_size`` (with the reference's
8-bit bicubic resize of :mod:`.pre_processor`).

``anomalib test`` scores an exported file on labelled data with AnomalyCLIP's metrics, e.g.
to check an INT8 model against the fp32 one on your own images::

    anomalib test --model ExportedAnomalyCLIP --model.path weights/openvino/model.xml \
        --data MVTecAD --data.root ./datasets/MVTecAD --data.category bottle

An export of a model that scores mutually (``anomalib export --model AnomalyCLIP --model.mutual true ...``) is
scored the same way: when the loop starts, each folder's images are run through the graph and scored against
each other subset by subset, streamed and resumable exactly as the eager model does (:mod:`.pool_scoring`); the
post-processor stored in the file then normalises the pool's scores. ``--model.mutual false`` refuses such a file
(its graph has no scores of its own), ``--model.mutual true`` refuses a file without what mutual scoring needs, and
``--model.pool_size`` chooses another subset size than the exported model's.

The graph's maps come out at its input size. The ground-truth masks are resized to it as the
model's default pre-processor resizes them (bilinear with antialiasing, then > 0.5), so the
metrics of an fp32 export match those of ``anomalib test --model AnomalyCLIP`` (see
docs/deployment.md for the measured differences).

Example:
    >>> from anomalib.engine import Engine
    >>> from anomalib_anomalyclip.integration.exported_model import ExportedAnomalyCLIP
    >>> model = ExportedAnomalyCLIP("weights/openvino/model.xml")  # doctest: +SKIP
    >>> Engine().predict(model, data_path="images/")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from anomalib import LearningType
from anomalib.data import Batch, InferenceBatch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.visualization import Visualizer
from lightning.pytorch import Callback
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn

from anomalib_anomalyclip._registry import expose
from anomalib_anomalyclip.errors import ExportedFileError, ExportedFileNotFoundError, explain_setup_errors
from anomalib_anomalyclip.integration.export import read_pool_metadata
from anomalib_anomalyclip.integration.pool_scoring import PooledLoops
from anomalib_anomalyclip.integration.pool_state import file_stamps
from anomalib_anomalyclip.integration.post_processor import post_processor_from_state
from anomalib_anomalyclip.method.mutual import MutualScoring
from anomalib_anomalyclip.method.pooled_model import EncodedBatch
from anomalib_anomalyclip.method.resize import resize_image_like_pil, resize_mask_like_pil

__all__ = ["ExportedAnomalyCLIP", "ExportedGraph"]

OPENVINO_SUFFIXES = {".xml", ".onnx"}
TORCH_SUFFIXES = {".pt", ".pth"}
OUTPUT_FIELDS = ("pred_score", "pred_label", "anomaly_map", "pred_mask")
DEFAULT_OPENVINO_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}
"""OpenVINO computes in bf16 by default on CPUs with native bf16, which moves scores by up to 1e-2 from the
model's; exported models run in f32 unless a precision hint is given."""


class ExportedGraph(nn.Module):
    """An exported model file as a module: (B, 3, H, W) images in [0, 1] to an ``InferenceBatch``.

    Args:
        path: ``.xml`` (OpenVINO IR) or ``.onnx``, run with ``OpenVINOInferencer``; or
            ``.pt`` from ``to_torch``, run with ``TorchInferencer`` (unpickling needs
            ``TRUST_REMOTE_CODE=1``, as anomalib requires).
        device: OpenVINO device (``CPU``, ``GPU``, ``AUTO``) or torch device (``cpu``,
            ``cuda``, ``auto``).
        config: OpenVINO compile options, e.g. ``{"INFERENCE_PRECISION_HINT": "bf16"}``. Without an
            ``INFERENCE_PRECISION_HINT`` the graph runs in f32 (see :data:`DEFAULT_OPENVINO_CONFIG`).

    An export of a model that scores mutually also serves :func:`.pool_scoring.score_pools` (a
    :class:`.pool_scoring.PoolEncoder`): :attr:`mutual` holds its settings, :attr:`pool_metadata` the rest of what
    the file says about its pools.

    Raises:
        ValueError: the file type is not one of the above.
        FileNotFoundError: the file does not exist.
    """

    def __init__(self, path: str | Path, device: str = "CPU", config: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.pool_metadata: dict[str, Any] | None = None
        if not self.path.is_file():
            raise ExportedFileNotFoundError(
                f"Exported model '{self.path}' does not exist: give the file `anomalib export` wrote, e.g. "
                "--model.path <export_root>/weights/openvino/model.xml"
            )
        suffix = self.path.suffix.lower()
        if suffix in OPENVINO_SUFFIXES:
            from anomalib.deploy import OpenVINOInferencer

            config = {**DEFAULT_OPENVINO_CONFIG, **(config or {})}
            check_precision_hint(device, config)
            self.inferencer = OpenVINOInferencer(self.path, device=device.upper(), config=config)
            self.input_size = _static_size(self.inferencer.input_blob.get_partial_shape())
            self.pool_metadata = read_pool_metadata(self.path)
        elif suffix in TORCH_SUFFIXES:
            from anomalib.deploy import TorchInferencer

            if os.environ.get("TRUST_REMOTE_CODE", "0").lower() not in {"1", "true"}:  # anomalib's own rule
                raise ExportedFileError(
                    f"'{self.path}' is a Torch export, a pickle that can run code when it is loaded, so anomalib "
                    "loads it only with TRUST_REMOTE_CODE=1 in the environment: set it if you made the file yourself, "
                    "or export to OpenVINO (--export_type openvino), which needs no such trust."
                )

            self.inferencer = TorchInferencer(self.path, device=device.lower())
            self.input_size = None
        else:
            known = ", ".join(sorted(OPENVINO_SUFFIXES | TORCH_SUFFIXES))
            raise ExportedFileError(f"Unknown exported model type '{self.path.name}': expected one of {known}.")
        self.config = config
        self.mutual = MutualScoring(**self.pool_metadata["mutual"]) if self.pool_metadata else None

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        """Run the exported graph on (B, 3, H, W) images with values in [0, 1]."""
        outputs = self._run(images)
        return InferenceBatch(**{name: outputs.get(name) for name in OUTPUT_FIELDS})

    def encode_pool_member(self, images: torch.Tensor) -> EncodedBatch:
        """The graph's outputs for mutual scoring of (B, 3, H, W) images in [0, 1] (an export of mutual scoring)."""
        outputs = self._run(images)
        return EncodedBatch(**{name: outputs[name] for name in EncodedBatch._fields})

    def token_grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """Patch grid (rows, columns) of the tokens of images whose maps have ``size``."""
        patch = int(self.pool_metadata["patch_size"])
        return size[0] // patch, size[1] // patch

    def pool_fingerprint(self) -> dict[str, Any]:
        """What the graph's outputs depend on: the exported files and how they are run."""
        files = [str(self.path), str(self.path.with_suffix(".bin"))]
        return {"exported": file_stamps(files), "config": repr(sorted((self.config or {}).items()))}

    def _run(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The graph's outputs by name (on the CPU) for (B, 3, H, W) images in [0, 1]."""
        if self.input_size is not None and tuple(images.shape[-2:]) != self.input_size:
            images = resize_image_like_pil(images, self.input_size)
        if isinstance(self.inferencer.model, nn.Module):
            with torch.inference_mode():
                outputs = self.inferencer.model(images.to(self.inferencer.device))._asdict()
        else:
            raw = self.inferencer.model({self.inferencer.input_blob.any_name: images.cpu().numpy()})
            outputs = {
                name: torch.from_numpy(np.asarray(value)) for name, value in self.inferencer.post_process(raw).items()
            }
        return {name: value.detach().cpu() for name, value in outputs.items() if value is not None}


class ExportedAnomalyCLIP(PooledLoops, AnomalibModule):
    """An exported AnomalyCLIP file as an anomalib model, for ``anomalib predict`` (see the module docs).

    Args:
        path: the exported file (``.xml``, ``.onnx`` or ``.pt``).
        device: inference device (OpenVINO: ``CPU``/``GPU``/``AUTO``; Torch: ``cpu``/``cuda``/``auto``).
        config: OpenVINO compile options, e.g. ``{"INFERENCE_PRECISION_HINT": "bf16"}``.
        mutual: score each image against the other images of its pool (the file must be an export of a model that
            scores mutually); ``None``: as the file was exported.
        pool_size: largest subset of a pool scored at once; ``None``: the exported model's.
        evaluator: anomalib evaluator, ``True`` for AnomalyCLIP's metrics, ``False`` for none.
        visualizer: anomalib visualizer, or ``True`` for the default.
    """

    @explain_setup_errors
    def __init__(
        self,
        path: str | None = None,
        device: str = "CPU",
        config: dict[str, Any] | None = None,
        mutual: bool | None = None,
        pool_size: int | None = None,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        if path is None:
            raise ExportedFileError(
                "ExportedAnomalyCLIP scores images with an exported AnomalyCLIP file and needs its path: "
                "--model.path <export_root>/weights/openvino/model.xml (or .onnx, or weights/torch/model.pt), "
                "as written by `anomalib export --model AnomalyCLIP ...`."
            )
        graph = ExportedGraph(path, device, config)
        graph.mutual = pool_settings(graph, mutual, pool_size)
        # A graph of mutual scoring stops before the post-processor: it runs here, after the pool is scored.
        post_processor = post_processor_from_state(graph.pool_metadata["post_processor"]) if graph.mutual else False
        super().__init__(pre_processor=False, post_processor=post_processor, evaluator=evaluator, visualizer=visualizer)
        self.model = graph

    @staticmethod
    def configure_evaluator() -> Evaluator:
        """AnomalyCLIP's metrics, so that an export is scored like the model it came from."""
        from anomalib_anomalyclip.integration.lightning_model import AnomalyCLIP

        return AnomalyCLIP.configure_evaluator()

    def configure_callbacks(self) -> list[Callback]:
        """Write ``predictions.csv`` in ``predict`` as ``AnomalyCLIP`` does (same columns, same decision rule)."""
        from anomalib_anomalyclip.integration.callbacks import PredictionCsvWriter

        return [*super().configure_callbacks(), PredictionCsvWriter()]

    @property
    def learning_type(self) -> LearningType:
        """Nothing to learn: the graph is fixed."""
        return LearningType.ZERO_SHOT

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No trainer settings of its own."""
        return {}

    def configure_optimizers(self) -> None:
        """Nothing to optimise."""
        return

    def val_dataloader(self) -> list:
        """No validation: thresholds and normalisation are inside the exported graph."""
        return []

    def on_validation_start(self) -> None:
        """With mutual scoring, score the loop's pools (see :mod:`.pool_scoring`)."""
        self._score_pools(self.trainer.val_dataloaders)

    def on_test_start(self) -> None:
        """With mutual scoring, score the loop's pools (see :mod:`.pool_scoring`)."""
        self._score_pools(self.trainer.test_dataloaders)

    def on_predict_start(self) -> None:
        """With mutual scoring, score the loop's pools (see :mod:`.pool_scoring`)."""
        self._score_pools(self.trainer.predict_dataloaders)

    def on_predict_end(self) -> None:
        """Remove the state of mutual scoring's pools: ``predictions.csv`` and the overlays hold the results."""
        self.discard_pool_state()

    def on_test_end(self) -> None:
        """Remove the state of mutual scoring's pools: the metrics are computed."""
        self.discard_pool_state()

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Score the batch (nothing is collected: thresholds and normalisation are fixed in the graph)."""
        del args, kwargs
        return batch.update(**self._scored(batch)._asdict())

    def test_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Score the batch; its ground-truth masks are resized to the maps (for the pixel metrics)."""
        del args, kwargs
        predictions = self._scored(batch)
        gt_mask = masks_at_map_size(batch.gt_mask, predictions.anomaly_map)
        return batch.update(gt_mask=gt_mask, **predictions._asdict())

    def predict_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Score the batch (with mutual scoring: look its images up in the pools scored at the loop's start)."""
        del args, kwargs
        return batch.update(**self._scored(batch)._asdict())

    def _scored(self, batch: Batch) -> InferenceBatch:
        return self.pooled(batch) if self.pool_scores is not None else self.model(batch.image)

    def _score_pools(self, dataloaders: Any) -> None:
        self.pool_scores = None
        if self.model.mutual is not None:
            self.score_loop_pools(self.model, None, dataloaders)


def pool_settings(graph: ExportedGraph, mutual: bool | None, pool_size: int | None) -> MutualScoring | None:
    """The mutual-scoring settings to score with ``graph``: the file's, with ``pool_size`` when given.

    Raises:
        ExportedFileError: ``mutual`` asks for what the file cannot do, or ``pool_size`` without mutual scoring.
    """
    exported = graph.mutual
    if mutual and exported is None:
        raise ExportedFileError(
            f"'{graph.path}' was exported from a model that scores images one by one: it has no outputs for mutual "
            "scoring. Export the checkpoint again with mutual scoring on (anomalib export --model AnomalyCLIP "
            "--model.mutual true --ckpt_path ... --export_type openvino), or leave --model.mutual out."
        )
    if mutual is False and exported is not None:
        raise ExportedFileError(
            f"'{graph.path}' was exported from a model that scores mutually: its graph returns what a pool needs, not "
            "scores of single images. Export the checkpoint with --model.mutual false to score images one by one."
        )
    if pool_size is not None and exported is None:
        raise ExportedFileError(f"--model.pool_size is for mutual scoring; '{graph.path}' scores images one by one.")
    if pool_size is None:
        return exported
    return dataclasses.replace(exported, pool_size=pool_size)


def check_precision_hint(device: str, config: dict[str, Any] | None) -> None:
    """Refuse a bf16 precision hint on a CPU without native bf16.

    OpenVINO accepts the hint there but emulates bf16: on a 2-core AVX-512 CPU without
    bf16, ViT-L/14@336 at 518 px then took minutes per image instead of seconds, or crashed.

    Raises:
        ValueError: bf16 was asked for and the CPU has no bf16 support.
    """
    hint = str((config or {}).get("INFERENCE_PRECISION_HINT", "")).lower()
    if hint not in {"bf16", "bfloat16"} or device.upper() != "CPU":
        return
    import openvino

    capabilities = openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if "BF16" not in capabilities:
        raise ValueError(
            f"This CPU has no native bf16 (OpenVINO capabilities: {', '.join(capabilities)}); OpenVINO would emulate "
            "it, far slower than f32. Leave INFERENCE_PRECISION_HINT at f32 here (or use INT8 for speed)."
        )


def masks_at_map_size(gt_mask: torch.Tensor | None, anomaly_map: torch.Tensor | None) -> torch.Tensor | None:
    """``gt_mask`` (B, H, W) resized to the maps' size, as the reference pre-processing resizes masks (bilinear > 0.5).

    Returns ``gt_mask`` unchanged when there is nothing to match.
    """
    if gt_mask is None or anomaly_map is None or gt_mask.shape[-2:] == anomaly_map.shape[-2:]:
        return gt_mask
    return resize_mask_like_pil(gt_mask, list(anomaly_map.shape[-2:]))


def _static_size(shape: Any) -> tuple[int, int] | None:
    """(H, W) of an OpenVINO input shape when both are static, else ``None``."""
    height, width = shape[2], shape[3]
    if height.is_static and width.is_static:
        return int(height.get_length()), int(width.get_length())
    return None


expose(ExportedAnomalyCLIP)  # also when this module is imported first (see _registry)

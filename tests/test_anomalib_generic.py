"""anomalib's generic model check, written for AnomalyCLIP: every Engine entry point with a few-shot model.

anomalib runs the same sequence on each of its models (fit, then test, train, validate,
predict and export with the checkpoint at anomalib's standard path); this is that sequence
for AnomalyCLIP with a tiny CLIP and ``k_shot=4``, plus the check that the checkpoint
reproduces the model that wrote it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.deploy import ExportType
from anomalib.engine import Engine

from anomalib_anomalyclip import AnomalyCLIP
from anomalib_anomalyclip.testing.tiny_clip import TinyClipConfig, save_openai_state_dict
from anomalib_anomalyclip.testing.toy_data import make_mvtec_like_dataset

pytestmark = pytest.mark.slow


def test_every_engine_entry_point_with_a_few_shot_model(
    tmp_path: Path, tiny_prompt_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    clip_path = save_openai_state_dict(tmp_path / "clip.pt", TinyClipConfig(vision_layers=6), seed=0)
    data = make_mvtec_like_dataset(tmp_path / "data", categories=("dummy",), image_size=64, n_train_good=5)
    datamodule = MVTecAD(root=data, category="dummy", train_batch_size=4, eval_batch_size=4, num_workers=0)
    project = tmp_path / "project"

    def model() -> AnomalyCLIP:
        return AnomalyCLIP(
            pretrained=str(clip_path),
            image_size=56,
            dpam_start_layer=3,
            prompt_weights=str(tiny_prompt_path),
            k_shot=4,
            visualizer=False,
        )

    engine = Engine(logger=False, default_root_dir=project, max_epochs=1, devices=1, accelerator="cpu")
    made = model()
    engine.fit(made, datamodule=datamodule)
    checkpoint = project / "AnomalyCLIP" / "MVTecAD" / "dummy" / "v0" / "weights" / "lightning" / "model.ckpt"
    assert checkpoint.is_file()
    original = torch.cat([batch.anomaly_map for batch in engine.predict(made, datamodule=datamodule)])

    restored = model()
    (metrics,) = engine.test(restored, datamodule=datamodule, ckpt_path=checkpoint)
    assert {"image_AUROC", "pixel_AUROC"} <= set(metrics)
    predictions = engine.predict(model(), datamodule=datamodule, ckpt_path=checkpoint)
    assert (torch.cat([batch.anomaly_map for batch in predictions]) - original).abs().max() <= 1e-6
    engine.train(model(), datamodule=datamodule)
    engine.validate(model(), datamodule=datamodule, ckpt_path=checkpoint)
    for export_type in (ExportType.TORCH, ExportType.ONNX, ExportType.OPENVINO):
        exported = engine.export(model(), export_type, export_root=tmp_path / "exported", ckpt_path=checkpoint)
        assert exported is not None and exported.is_file(), export_type
    # The frozen CLIP is not in the checkpoint, and loading it must not list its keys as missing.
    assert not [warning for warning in recwarn if "not in the checkpoint" in str(warning.message)]

"""Checkpoints written before the package was reorganised load and score as they did (within 1e-6).

The files in ``tests/fixtures/legacy_checkpoints`` were written by ``make.py`` there, with main at c33d14c:
a zero-shot model with given prompts, prompts trained on labelled images, and a 4-shot model, all on a tiny CLIP
that this test re-creates from its seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomalib_anomalyclip import AnomalyCLIP
from anomalib_anomalyclip.testing import TinyClipConfig, save_openai_state_dict, tiny_clip_digest

FIXTURES = Path(__file__).parent / "fixtures" / "legacy_checkpoints"
CLIP_CONFIG = TinyClipConfig(vision_layers=6)


@pytest.fixture(scope="module")
def expected() -> dict:
    return torch.load(FIXTURES / "expected.pt", weights_only=True)


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory: pytest.TempPathFactory, expected: dict) -> Path:
    assert tiny_clip_digest(CLIP_CONFIG) == expected["clip_sha256"], (
        "the tiny CLIP writer no longer gives the same CLIP"
    )
    return save_openai_state_dict(tmp_path_factory.mktemp("legacy") / "clip.pt", CLIP_CONFIG, seed=0)


@pytest.mark.parametrize("name", ["zero_shot", "trained", "four_shot"])
def test_checkpoints_of_the_previous_layout_score_the_same(name: str, clip_path: Path, expected: dict) -> None:
    images = torch.stack(
        [
            torch.from_numpy(np.array(Image.open(FIXTURES / "images" / file).convert("RGB")))
            for file in expected["images"]
        ]
    )
    images = images.permute(0, 3, 1, 2).float() / 255
    model = AnomalyCLIP.load_from_checkpoint(FIXTURES / f"{name}.ckpt", pretrained=str(clip_path), prompt_weights=None)
    with torch.no_grad():
        output = model.eval()(images)
    assert (output.pred_score - expected[name]["pred_score"]).abs().max() <= 1e-6
    assert (output.anomaly_map - expected[name]["anomaly_map"]).abs().max() <= 1e-6

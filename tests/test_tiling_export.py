"""A tiled model exports as one graph: the full image in, its score and full-resolution map out.

The model tiles each image at its own size, so the export is for a fixed input size (2048 x 1536 here); its few-shot
bank holds the tiles of two references. A tiny CLIP (6 blocks, 32 px patches) at a 256 px input gives 6 x 8 tiles and
the global view; the graph cuts, encodes, joins and fuses them inside.
The ONNX graph runs in OpenVINO's runtime, and its conversion to OpenVINO IR is the one anomalib's ``to_openvino`` does
(``openvino.convert_model`` of that ONNX file).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomalib_anomalyclip import AnomalyCLIP
from anomalib_anomalyclip.integration.exported_model import DEFAULT_OPENVINO_CONFIG
from anomalib_anomalyclip.method.tiling import TilingError
from anomalib_anomalyclip.testing.tiny_clip import TinyClipConfig, save_openai_state_dict

HEIGHT, WIDTH = 1536, 2048
SIZE = 256
TOLERANCE = 1e-3
OUTPUTS = ("pred_score", "anomaly_map")


def _picture(seed: int) -> np.ndarray:
    """An 8-bit RGB image of HEIGHT x WIDTH: smooth shading, noise and a few dark spots."""
    generator = torch.Generator().manual_seed(seed)
    shading = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 8, generator=generator), size=(HEIGHT, WIDTH))
    image = shading[0] * 0.6 + 0.2 + 0.03 * torch.randn(3, HEIGHT, WIDTH, generator=generator)
    for row, column in torch.randint(100, 1400, (3, 2), generator=generator).tolist():
        image[:, row : row + 8, column : column + 8] = 0.05
    return (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, tiny_prompt_path: Path) -> AnomalyCLIP:
    root = tmp_path_factory.mktemp("tiled_export")
    config = TinyClipConfig(vision_layers=6, vision_patch_size=32, image_resolution=SIZE)
    clip = save_openai_state_dict(root / "clip.pt", config)
    references = root / "references"
    references.mkdir()
    for index in range(2):
        Image.fromarray(_picture(index)).save(references / f"{index}.png")
    model = AnomalyCLIP(
        pretrained=str(clip), prompt_weights=str(tiny_prompt_path), image_size=SIZE, dpam_start_layer=3,
        tile_size=SIZE, k_shot=2, few_shot_source=str(references), visualizer=False, evaluator=False,
    ).eval()  # fmt: skip
    model.collect_references(required=True)
    return model


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.from_numpy(_picture(7)).permute(2, 0, 1)[None].float() / 255


@pytest.fixture(scope="module")
def eager(model: AnomalyCLIP, image: torch.Tensor) -> dict[str, np.ndarray]:
    with torch.inference_mode():
        outputs = model(image)
    assert outputs.anomaly_map.shape == (1, 1, HEIGHT, WIDTH)
    return {name: getattr(outputs, name).numpy() for name in OUTPUTS}


@pytest.fixture(scope="module")
def exported(model: AnomalyCLIP, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import openvino

    root = tmp_path_factory.mktemp("tiled_exports")
    onnx_path = model.to_onnx(root, input_size=(HEIGHT, WIDTH))
    xml_path = root / "model.xml"
    openvino.save_model(openvino.convert_model(onnx_path), xml_path, compress_to_fp16=False)
    return {"torch": model.to_torch(root), "onnx": onnx_path, "openvino": xml_path}


def _differences(outputs: dict[str, np.ndarray], eager: dict[str, np.ndarray]) -> dict[str, float]:
    return {
        name: float(np.abs(np.asarray(outputs[name]).reshape(eager[name].shape) - eager[name]).max())
        for name in OUTPUTS
    }


@pytest.mark.slow  # tens of seconds to minutes of CPU: the full suite runs it
@pytest.mark.parametrize("export_type", ["onnx", "openvino"])
def test_exported_graph_of_a_tiled_model_matches_eager_on_a_2048_px_image(
    exported: dict[str, Path], image: torch.Tensor, eager: dict[str, np.ndarray], export_type: str
) -> None:
    from anomalib.deploy import OpenVINOInferencer

    inferencer = OpenVINOInferencer(exported[export_type], device="CPU", config=DEFAULT_OPENVINO_CONFIG)
    outputs = inferencer.post_process(inferencer.model({inferencer.input_blob.any_name: image.numpy()}))
    assert _differences(outputs, eager)["anomaly_map"] <= TOLERANCE
    assert _differences(outputs, eager)["pred_score"] <= TOLERANCE
    assert np.asarray(outputs["anomaly_map"]).shape[-2:] == (HEIGHT, WIDTH)


def test_torch_export_of_a_tiled_model_matches_eager(
    exported: dict[str, Path], image: torch.Tensor, eager: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    from anomalib.deploy import TorchInferencer

    monkeypatch.setitem(os.environ, "TRUST_REMOTE_CODE", "1")  # TorchInferencer refuses to unpickle without it
    inferencer = TorchInferencer(exported["torch"], device="cpu")
    assert inferencer.model.model.tiling is not None  # the inference path, tiled, without the text encoder
    assert not [key for key in inferencer.model.state_dict() if "text_encoder" in key or "prompt_learner" in key]
    with torch.inference_mode():
        outputs = inferencer.model(image)
    assert max(_differences({name: getattr(outputs, name).numpy() for name in OUTPUTS}, eager).values()) <= 1e-5


def test_a_graph_for_each_image_size_needs_its_size(model: AnomalyCLIP, tmp_path: Path) -> None:
    with pytest.raises(TilingError, match="--input_size H W"):
        model.to_onnx(tmp_path)
    assert model.model.tiling is not None and hasattr(model.model, "text_encoder")  # the full model is back

"""Exported mutual scoring: ``anomalib export`` of a model that scores mutually, then ``ExportedAnomalyCLIP``.

The exported graph returns what a pool needs (the prompts' score and map, the mutual blocks' tokens, the class
embedding); ``ExportedAnomalyCLIP`` scores each folder's pool through the same streamed path as the eager model and
applies the post-processor stored in the file. Scores and maps must equal the eager model's within 1e-4.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch

from anomalib_anomalyclip import AnomalyCLIP  # also makes the short names known to anomalib's CLI
from anomalib_anomalyclip.errors import ExportedFileError
from anomalib_anomalyclip.integration.exported_model import ExportedAnomalyCLIP
from anomalib_anomalyclip.integration.pool_scoring import MutualPoolError
from anomalib_anomalyclip.testing.toy_data import make_mvtec_like_dataset

pytestmark = pytest.mark.slow

TOLERANCE = 1e-4
POOL = ["--model.mutual", "true", "--model.mutual.pool_size", "5"]  # 12 images: two subsets
SHOTS = {"zero_shot": 0, "two_shot": 2}
EXPORTS = {"openvino": "weights/openvino/model.xml", "onnx": "weights/onnx/model.onnx"}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mutual_export")
    return make_mvtec_like_dataset(
        root / "data", ("alpha",), image_size=64, n_train_good=2, n_test_good=8, n_test_defect=2,
        defects=("blob", "stain"),
    )  # fmt: skip


@pytest.fixture(scope="module")
def folder(data: Path) -> Path:
    """12 images to predict on, one folder: one pool, two subsets at pool size 5."""
    root = data.parent / "to_predict"
    root.mkdir()
    for image in sorted((data / "alpha" / "test").rglob("*.png")):
        shutil.copy(image, root / f"{image.parent.name}_{image.name}")
    assert len(list(root.glob("*.png"))) == 12
    return root


def _model_args(shots: str, data: Path, tiny_clip_path: Path, tiny_prompt_path: Path) -> list[str]:
    arguments = [
        "--model", "AnomalyCLIP", "--model.pretrained", str(tiny_clip_path), "--model.image_size", "56",
        "--model.prompt_weights", str(tiny_prompt_path), *POOL,
    ]  # fmt: skip
    if SHOTS[shots]:
        source = str(data / "alpha" / "train" / "good")
        arguments += ["--model.k_shot", str(SHOTS[shots]), "--model.few_shot.source", source]
    return arguments


def _cli(*arguments: str) -> None:
    from anomalib.cli import AnomalibCLI

    AnomalibCLI(list(arguments))


def _rows(root: Path) -> dict[str, tuple[float, str]]:
    (table,) = root.rglob("predictions.csv")
    with table.open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert len({row["path"] for row in rows}) == len(rows)  # each image once
    return {Path(row["path"]).name: (float(row["score"]), row["decision"]) for row in rows}


@pytest.fixture(scope="module", params=list(SHOTS))
def shots(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def exported(
    shots: str, data: Path, tiny_clip_path: Path, tiny_prompt_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """``anomalib export`` of the mutual-scoring model to OpenVINO and to ONNX: the exported files by type."""
    root = tmp_path_factory.mktemp(f"exported_{shots}")
    for export_type in EXPORTS:
        _cli("export", *_model_args(shots, data, tiny_clip_path, tiny_prompt_path), "--export_type", export_type,
             "--default_root_dir", str(root))  # fmt: skip
    return {export_type: root / path for export_type, path in EXPORTS.items()}


@pytest.fixture(scope="module")
def eager_rows(
    shots: str, data: Path, folder: Path, tiny_clip_path: Path, tiny_prompt_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[float, str]]:  # fmt: skip
    root = tmp_path_factory.mktemp(f"eager_{shots}")
    _cli("predict", *_model_args(shots, data, tiny_clip_path, tiny_prompt_path), "--data", str(folder),
         "--default_root_dir", str(root))  # fmt: skip
    return _rows(root)


@pytest.mark.parametrize("export_type", list(EXPORTS))
def test_exported_model_predicts_a_folder_as_the_eager_model(
    export_type: str, exported: dict[str, Path], eager_rows: dict, folder: Path, tmp_path: Path
) -> None:
    _cli("predict", "--model", "ExportedAnomalyCLIP", "--model.path", str(exported[export_type]), "--data",
         str(folder), "--default_root_dir", str(tmp_path))  # fmt: skip
    rows = _rows(tmp_path)
    assert rows.keys() == eager_rows.keys()
    for name, (score, decision) in rows.items():
        assert score == pytest.approx(eager_rows[name][0], abs=TOLERANCE), name
        assert decision == eager_rows[name][1], name
    assert len(list(tmp_path.rglob("*.png"))) == len(rows)  # one overlay per image


def _predictions(model: object, folder: Path, root: Path) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    from anomalib.engine import Engine

    engine = Engine(default_root_dir=str(root), logger=False)
    batches = engine.predict(model, data_path=str(folder), return_predictions=True)
    paths = [path for batch in batches for path in batch.image_path]
    scores, maps = (torch.cat([getattr(batch, name) for batch in batches]) for name in ("pred_score", "anomaly_map"))
    return paths, scores, maps


def test_exported_scores_and_maps_equal_eager_within_tolerance(
    shots: str, exported: dict[str, Path], data: Path, folder: Path, tiny_clip_path: Path, tiny_prompt_path: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    few_shot = {"source": str(data / "alpha" / "train" / "good")} if SHOTS[shots] else {}
    eager_model = AnomalyCLIP(
        pretrained=str(tiny_clip_path), image_size=56, prompt_weights=str(tiny_prompt_path), k_shot=SHOTS[shots],
        few_shot=few_shot, mutual={"enabled": True, "pool_size": 5},
    )  # fmt: skip
    paths, scores, maps = _predictions(eager_model, folder, tmp_path / "eager")
    for export_type, path in exported.items():
        exported_paths, exported_scores, exported_maps = _predictions(
            ExportedAnomalyCLIP(str(path)), folder, tmp_path / export_type
        )
        assert exported_paths == paths
        assert torch.allclose(exported_scores, scores, atol=TOLERANCE, rtol=0), export_type
        assert exported_maps.shape == maps.shape
        assert torch.allclose(exported_maps, maps, atol=TOLERANCE, rtol=0), export_type


@pytest.mark.parametrize("shots", ["zero_shot"], indirect=True)
def test_int8_weights_keep_what_the_pool_needs(
    shots: str, data: Path, folder: Path, tiny_clip_path: Path, tiny_prompt_path: Path,
    eager_rows: dict, tmp_path: Path,
) -> None:  # fmt: skip
    _cli("export", *_model_args(shots, data, tiny_clip_path, tiny_prompt_path), "--export_type", "openvino",
         "--compression_type", "INT8", "--default_root_dir", str(tmp_path / "int8"))  # fmt: skip
    xml = tmp_path / "int8" / EXPORTS["openvino"]
    _cli("predict", "--model", "ExportedAnomalyCLIP", "--model.path", str(xml), "--data", str(folder),
         "--default_root_dir", str(tmp_path / "predicted"))  # fmt: skip
    rows = _rows(tmp_path / "predicted")
    assert rows.keys() == eager_rows.keys()
    # INT8 weights move the scores (by about 0.03 with the tiny random CLIP); the pool is still scored mutually.
    assert max(abs(score - eager_rows[name][0]) for name, (score, _) in rows.items()) < 0.1


def test_a_file_without_mutual_outputs_is_refused_for_mutual_scoring(
    tiny_clip_path: Path, tiny_prompt_path: Path, tmp_path: Path
) -> None:
    model = AnomalyCLIP(pretrained=str(tiny_clip_path), image_size=56, prompt_weights=str(tiny_prompt_path))
    path = model.to_onnx(tmp_path)
    written = path.read_bytes()
    with pytest.raises(ExportedFileError, match=r"no outputs for mutual scoring.*--model\.mutual true"):
        ExportedAnomalyCLIP(str(path), mutual=True)
    with pytest.raises(ExportedFileError, match="pool_size is for mutual scoring"):
        ExportedAnomalyCLIP(str(path), pool_size=10)
    assert path.read_bytes() == written  # nothing overwritten


def test_a_mutual_export_is_refused_for_scoring_images_one_by_one(exported: dict[str, Path]) -> None:
    with pytest.raises(ExportedFileError, match=r"scores mutually.*--model\.mutual false"):
        ExportedAnomalyCLIP(str(exported["onnx"]), mutual=False)
    assert ExportedAnomalyCLIP(str(exported["onnx"]), pool_size=12).model.mutual.pool_size == 12


def test_a_folder_below_the_minimum_pool_stops_before_any_image_is_encoded(
    exported: dict[str, Path], folder: Path, tmp_path: Path
) -> None:
    from anomalib.engine import Engine

    small = tmp_path / "three"
    small.mkdir()
    for image in sorted(folder.glob("*.png"))[:3]:
        shutil.copy(image, small / image.name)
    model = ExportedAnomalyCLIP(str(exported["openvino"]))
    encoded: list[int] = []
    model.model.encode_pool_member = lambda images: encoded.append(len(images))  # type: ignore[method-assign]
    with pytest.raises(MutualPoolError, match="at least 5 images per pool"):
        Engine(default_root_dir=str(tmp_path), logger=False).predict(model, data_path=str(small))
    assert encoded == []
    assert not list(tmp_path.rglob("predictions.csv"))


def test_anomalib_test_of_an_export_gives_the_eager_models_auroc(
    exported: dict[str, Path], shots: str, data: Path, tiny_clip_path: Path, tiny_prompt_path: Path, tmp_path: Path
) -> None:
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine

    def test(model: object, name: str) -> dict[str, float]:
        datamodule = MVTecAD(root=data, category="alpha", eval_batch_size=4, num_workers=0)
        (metrics,) = Engine(default_root_dir=str(tmp_path / name), logger=False).test(model, datamodule=datamodule)
        return metrics

    few_shot = {"source": str(data / "alpha" / "train" / "good")} if SHOTS[shots] else {}
    eager_model = AnomalyCLIP(
        pretrained=str(tiny_clip_path), image_size=56, prompt_weights=str(tiny_prompt_path), k_shot=SHOTS[shots],
        few_shot=few_shot, mutual={"enabled": True, "pool_size": 5},
    )  # fmt: skip
    eager = test(eager_model, "eager")
    by_export = test(ExportedAnomalyCLIP(str(exported["openvino"])), "openvino")
    for metric in ("image_AUROC", "pixel_AUROC"):
        assert by_export[metric] == pytest.approx(eager[metric], abs=TOLERANCE), metric

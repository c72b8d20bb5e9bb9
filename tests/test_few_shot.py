"""Few-shot AnomalyCLIP: the nearest-neighbour distance, the fusions, the bank and the references."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from anomalib import LearningType
from PIL import Image

from anomalib_anomalyclip.data.images import BadImageError
from anomalib_anomalyclip.integration.lightning_model import AnomalyCLIP
from anomalib_anomalyclip.method.dpam import Tap, TokenPath
from anomalib_anomalyclip.method.few_shot import (
    FewShotFusion,
    FewShotScorer,
    choose_references,
    fuse,
    nearest_distances,
)

IMAGE_SIZE = 56


def test_nearest_distance_is_the_smallest_cosine_distance_in_any_chunking() -> None:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 5, 8, generator=generator)
    bank = F.normalize(torch.randn(7, 8, generator=generator), dim=-1)
    expected = torch.tensor(
        [[min(1.0, min(1 - float(F.cosine_similarity(t, b, dim=0)) for b in bank)) for t in image] for image in tokens]
    )
    assert torch.allclose(nearest_distances(tokens, bank), expected, atol=1e-6)
    assert torch.allclose(nearest_distances(tokens, bank, chunk_rows=3), expected, atol=1e-6)
    assert nearest_distances(bank[None, :3] * 5, bank).abs().max() < 1e-6  # a bank token is at distance 0


def test_fusions_follow_the_documented_formulas() -> None:
    generator = torch.Generator().manual_seed(1)
    score = torch.tensor([0.2, 0.9])
    zero_shot, few_shot = torch.rand(2, 1, 4, 4, generator=generator), torch.rand(2, 1, 4, 4, generator=generator)
    peak = few_shot.flatten(1).amax(1)
    mean_score, mean_map = fuse(score, zero_shot, few_shot, FewShotFusion.MEAN)
    assert torch.allclose(mean_score, (score + peak) / 2) and torch.allclose(mean_map, (zero_shot + few_shot) / 2)
    harmonic_score, harmonic_map = fuse(score, zero_shot, few_shot, FewShotFusion.HARMONIC)
    assert torch.allclose(harmonic_score, 2 * score * peak / (score + peak), atol=1e-6)
    assert torch.allclose(harmonic_map, 2 * zero_shot * few_shot / (zero_shot + few_shot), atol=1e-6)
    alone_score, alone_map = fuse(score, zero_shot, few_shot, FewShotFusion.FEW_SHOT)
    assert torch.equal(alone_score, peak) and torch.equal(alone_map, few_shot)


def test_bank_round_trips_through_a_state_dict_and_rejects_other_taps() -> None:
    taps = (Tap(3, TokenPath.DPAM), Tap(4, TokenPath.DPAM))
    scorer = FewShotScorer(taps, "mean", dim=8)
    assert not scorer.active
    tokens = [torch.randn(3, 16, 8), torch.randn(3, 16, 8)]
    scorer.remember(tokens)
    assert scorer.memory.shape == (2, 48, 8) and scorer.memory_bytes == 2 * 48 * 8 * 4
    own = scorer.distance_map([layer[:1] for layer in tokens], (4, 4), (8, 8))
    assert own.shape == (1, 1, 8, 8) and own.abs().max() < 1e-6  # a reference is normal to its own bank
    left_out = scorer.without_rows(0, 16).distance_map([layer[:1] for layer in tokens], (4, 4), (8, 8))
    assert left_out.min() > 0

    restored = FewShotScorer(taps, "mean", dim=8)
    restored.load_state_dict(scorer.state_dict())
    assert torch.equal(restored.memory, scorer.memory)
    with pytest.raises(ValueError, match="1 tap"):
        FewShotScorer(taps[:1], "mean", dim=8).load_state_dict(scorer.state_dict())


def test_references_are_chosen_reproducibly_and_too_few_are_refused() -> None:
    paths = [f"/data/good/{index:03d}.png" for index in range(10)]
    chosen = choose_references(reversed(paths), 4, seed=3, source="the folder")
    assert chosen == sorted(chosen) and len(set(chosen)) == 4
    assert chosen == choose_references(paths, 4, seed=3, source="the folder")
    assert chosen != choose_references(paths, 4, seed=4, source="the folder")
    with pytest.raises(ValueError, match=r"k_shot=11 needs 11 .* the folder holds 10"):
        choose_references(paths, 11, seed=0, source="the folder")


@pytest.fixture(scope="module")
def mixed_references(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Normal images of other sizes and colour modes: RGB, grayscale, 16-bit grayscale, RGBA."""
    folder = tmp_path_factory.mktemp("references")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (80, 100, 3), dtype=np.uint8)).save(folder / "a_rgb.png")
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(folder / "b_gray.png")
    Image.fromarray(rng.integers(0, 65535, (70, 50), dtype=np.uint16)).save(folder / "c_gray16.png")
    Image.fromarray(rng.integers(0, 255, (60, 60, 4), dtype=np.uint8), mode="RGBA").save(folder / "d_rgba.png")
    return folder


def _few_shot_model(tiny_clip_path: Path, prompt_path: Path, **kwargs) -> AnomalyCLIP:
    return AnomalyCLIP(pretrained=str(tiny_clip_path), image_size=IMAGE_SIZE, prompt_weights=str(prompt_path), **kwargs)


def test_references_of_any_size_and_colour_mode_fill_the_bank_and_thresholds(
    tiny_clip_path: Path, tiny_prompt_path: Path, mixed_references: Path
) -> None:
    model = _few_shot_model(tiny_clip_path, tiny_prompt_path, k_shot=4, few_shot_source=str(mixed_references))
    assert model.learning_type is LearningType.FEW_SHOT
    model.collect_references(required=True)
    grid_tokens = (IMAGE_SIZE // 14) ** 2
    assert model.model.few_shot.memory.shape == (1, 4 * grid_tokens, model.model.visual_encoder.output_dim)
    assert "leave-one-out" in model.post_processor.threshold_origin
    # A reference scored against the bank that holds it is perfectly normal on the few-shot side.
    alone = _few_shot_model(tiny_clip_path, tiny_prompt_path, k_shot=4, few_shot_fusion="few_shot")
    alone.model.few_shot.memory = model.model.few_shot.memory
    reference = model.pre_processor.transform(
        torch.from_numpy(np.asarray(Image.open(mixed_references / "a_rgb.png"), dtype=np.float32) / 255)
        .permute(2, 0, 1)
        .unsqueeze(0)
    )
    assert float(alone.model.eval()(reference).pred_score) < 1e-5


def test_original_stream_bank_reads_the_same_forward(tiny_clip_path: Path, tiny_prompt_path: Path) -> None:
    model = _few_shot_model(
        tiny_clip_path, tiny_prompt_path, k_shot=2, few_shot_tokens="original", few_shot_layers=[2, 4]
    )
    assert model.model.few_shot.taps == (Tap(2, TokenPath.ORIGINAL), Tap(4, TokenPath.ORIGINAL))
    images = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(2))
    model.model.remember_references(images[:2])
    zero_shot = _few_shot_model(tiny_clip_path, tiny_prompt_path).model.eval()(images[2:])
    few_shot = model.model.eval()(images[2:])
    assert few_shot.anomaly_map.shape == zero_shot.anomaly_map.shape
    assert not torch.allclose(few_shot.pred_score, zero_shot.pred_score)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"k_shot": -1}, ValueError, "k_shot must be 0"),
        ({"k_shot": 2, "few_shot_fusion": "max"}, ValueError, "few_shot.fusion"),
        ({"k_shot": 2, "few_shot_layers": [99]}, ValueError, r"few_shot.layers \[99\] outside"),
        ({"k_shot": 2, "normal_quantile": 1.5}, ValueError, "false-alarm rate"),
    ],
)
def test_bad_few_shot_arguments_fail_at_construction(
    tiny_clip_path: Path, tiny_prompt_path: Path, kwargs: dict, error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        _few_shot_model(tiny_clip_path, tiny_prompt_path, **kwargs)


def test_bad_reference_sources_are_explained(tiny_clip_path: Path, tiny_prompt_path: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(BadImageError, match="No images found"):
        _few_shot_model(tiny_clip_path, tiny_prompt_path, k_shot=1, few_shot_source=str(empty)).collect_references(True)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    with pytest.raises(BadImageError, match=r"bad\.png"):
        _few_shot_model(tiny_clip_path, tiny_prompt_path, k_shot=1, few_shot_source=str(broken)).collect_references(
            True
        )
    with pytest.raises(FileNotFoundError, match="missing"):
        model = _few_shot_model(tiny_clip_path, tiny_prompt_path, k_shot=1, few_shot_source=str(tmp_path / "missing"))
        model.collect_references(True)
    few = _few_shot_model(tiny_clip_path, tiny_prompt_path, k_shot=5, few_shot_source=str(broken.parent / "empty"))
    with pytest.raises(BadImageError):
        few.collect_references(True)
    without_source = _few_shot_model(tiny_clip_path, tiny_prompt_path, k_shot=1)
    with pytest.raises(ValueError, match=r"few_shot\.source"):
        without_source.collect_references(True)
    with pytest.raises(ValueError, match="holds no references yet"):
        without_source.to_torch(tmp_path / "export")


@pytest.mark.slow  # tens of seconds to minutes of CPU: the full suite runs it
def test_references_beat_zero_shot_on_categories_no_prompt_was_trained_on(tmp_path: Path, tiny_clip_path: Path) -> None:
    import dataclasses

    from anomalyclip_bench.few_shot_study import (
        StudyConfig,
        evaluate,
        generate,
        mean_by_setting,
        train_prompts,
    )

    config = StudyConfig(shots=(1, 2, 4))
    auxiliary, targets = generate(tmp_path, config)
    model = train_prompts(auxiliary, tiny_clip_path, tmp_path / "runs", config)
    rows = evaluate(model, targets, config)
    assert {row.kind for row in rows} == {"texture", "object", "grayscale"}
    means = mean_by_setting(rows)
    zero_shot_image, zero_shot_pixel = means[(0, "zero_shot")]
    # Prompts trained on other generated categories: their maps already find these defects (pixel ~0.89).
    for k_shot in config.shots:
        image, pixel = means[(k_shot, "harmonic")]
        assert image >= zero_shot_image + 0.15, (k_shot, means)
        assert pixel >= zero_shot_pixel, (k_shot, means)
        assert means[(k_shot, "mean")][0] >= zero_shot_image + 0.1, (k_shot, means)
    assert means[(4, "few_shot")][1] >= 0.85, means

    # Weak (untrained) prompts: the references rescue the maps.
    untrained = train_prompts(auxiliary, tiny_clip_path, tmp_path, dataclasses.replace(config, epochs=0))
    weak = mean_by_setting(evaluate(untrained, targets, config))
    weak_image, weak_pixel = weak[(0, "zero_shot")]
    for k_shot in config.shots:
        assert weak[(k_shot, "harmonic")][1] >= weak_pixel + 0.15, (k_shot, weak)
    assert min(weak[(k_shot, "harmonic")][0] for k_shot in (2, 4)) >= weak_image + 0.15, weak

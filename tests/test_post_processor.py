"""Thresholds on AnomalyCLIP's probability scale: F1 with anomalies, a normal quantile without."""

from __future__ import annotations

import pytest
import torch
from anomalib.data import ImageBatch

from anomalib_anomalyclip.integration.post_processor import PIXEL_HISTOGRAM_BINS, ProbabilityPostProcessor


def _batch(labels: list[int], generator: torch.Generator) -> ImageBatch:
    count = len(labels)
    return ImageBatch(
        image=torch.zeros(count, 3, 8, 8),
        gt_label=torch.tensor(labels, dtype=torch.bool),
        gt_mask=torch.zeros(count, 8, 8, dtype=torch.bool),
        pred_score=torch.rand(count, generator=generator) * 0.6,
        anomaly_map=torch.rand(count, 1, 8, 8, generator=generator) * 0.8,
    )


def _validate(processor: ProbabilityPostProcessor, batches: list[ImageBatch]) -> None:
    for batch in batches:
        processor.on_validation_batch_end(None, None, batch)
    processor.on_validation_epoch_end(None, None)


def test_normal_only_validation_sets_quantile_thresholds() -> None:
    generator = torch.Generator().manual_seed(0)
    processor = ProbabilityPostProcessor(normal_quantile=0.95)
    processor.set_probability_scale(1.0)
    batches = [_batch([0, 0, 0, 0], generator) for _ in range(5)]
    _validate(processor, batches)
    scores = torch.cat([batch.pred_score for batch in batches])
    pixels = torch.cat([batch.anomaly_map.flatten() for batch in batches])
    assert float(processor.image_threshold) == pytest.approx(float(torch.quantile(scores.double(), 0.95)), abs=1e-6)
    assert float(processor.pixel_threshold) == pytest.approx(
        float(torch.quantile(pixels, 0.95)), abs=2 / PIXEL_HISTOGRAM_BINS
    )
    assert processor.threshold_origin == "0.95 quantile of 20 normal-only validation images"
    # The requested share of the normal images lies below the threshold.
    assert float((scores > processor.image_threshold).float().mean()) == pytest.approx(0.05)


def test_validation_with_anomalies_keeps_the_f1_threshold() -> None:
    generator = torch.Generator().manual_seed(1)
    processor = ProbabilityPostProcessor(normal_quantile=0.95)
    processor.set_probability_scale(1.0)
    batch = _batch([0, 0, 1, 1], generator)
    batch.pred_score = torch.tensor([0.1, 0.2, 0.7, 0.8])
    _validate(processor, [batch])
    assert 0.2 <= float(processor.image_threshold) <= 0.7
    assert processor.threshold_origin.startswith("adaptive F1")


def test_normal_quantile_is_kept_in_the_checkpoint_configuration() -> None:
    processor = ProbabilityPostProcessor(normal_quantile=0.9)
    restored = ProbabilityPostProcessor()
    restored.load_checkpoint_config(processor.checkpoint_config())
    assert restored.normal_quantile == 0.9
    with pytest.raises(ValueError, match="false-alarm rate"):
        ProbabilityPostProcessor(normal_quantile=0)


def test_a_score_at_the_threshold_gets_one_decision_eager_and_exported() -> None:
    """The image whose score is the threshold is normal whether it comes out at 0.5 or 1e-6 above (export noise)."""
    import torch
    from anomalib.data import InferenceBatch

    from anomalib_anomalyclip.integration.post_processor import DECISION_MARGIN, ProbabilityPostProcessor

    processor = ProbabilityPostProcessor()
    processor.set_probability_scale(1.0)
    scores = torch.tensor([0.5, 0.5 + 1e-6, 0.5 + 2 * DECISION_MARGIN])
    labels = processor(InferenceBatch(pred_score=scores, anomaly_map=torch.zeros(3, 1, 2, 2))).pred_label
    assert labels.tolist() == [False, False, True]

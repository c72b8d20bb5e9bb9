"""The adapter that runs the reference implementation inside ``benchmarks/inference.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anomalib_anomalyclip.method.prompts import convert_reference_state
from anomalyclip_bench import reference_anomalyclip


@pytest.fixture(scope="module")
def adapter():
    return reference_anomalyclip


def test_prompts_map_onto_the_reference_layout_and_back(adapter) -> None:
    n_ctx, width = 12, 16
    ours = {
        "normal_context": torch.randn(n_ctx, width),
        "abnormal_context": torch.randn(n_ctx, width),
        **{f"text_tokens.{i}": torch.randn(4, width) for i in range(8)},
    }
    # The reference learner keeps one context per class and prompt: (1, 1, n_ctx, width).
    reference_shapes = {"ctx_pos": torch.empty(1, 1, n_ctx, width), "ctx_neg": torch.empty(1, 1, n_ctx, width)}

    reference = adapter.reference_prompt_state(ours, reference_shapes)

    assert reference["ctx_pos"].shape == (1, 1, n_ctx, width)
    assert sorted(k for k in reference if k.startswith("compound")) == [f"compound_prompts_text.{i}" for i in range(8)]
    back = convert_reference_state(reference)
    assert back.keys() == ours.keys()
    for key, tensor in ours.items():
        assert torch.equal(back[key], tensor), key


def test_a_folder_without_the_reference_code_is_named(adapter, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"no AnomalyCLIP_lib/.*zqhang/AnomalyCLIP"):
        adapter.load_reference(tmp_path, {}, {}, 518, torch.device("cpu"))

"""Score images with the reference implementation (github.com/zqhang/AnomalyCLIP) from a local checkout.

Used by ``benchmarks/inference.py --reference-repo PATH`` to time the reference code in the
same run as ours and to measure how far our outputs are from it with the same weights and
prompts. The checkout is imported unmodified; per image this does what the reference's
``test.py`` does (``encode_image`` with DPAM from layer 20, similarity maps, bilinear
upsampling, the ``(abnormal + 1 - normal) / 2`` map, ``scipy.ndimage.gaussian_filter``).

Two of the checkout's imports are missing from current Python stacks and are provided
before it is imported: ``thop`` (imported by ``AnomalyCLIP.py``, never used) and
``pkg_resources.packaging`` (gone from recent setuptools; only its module is needed).
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

# The reference's inference settings (test.py with the released checkpoints).
DESIGN = {"Prompt_length": 12, "learnabel_text_embedding_depth": 9, "learnabel_text_embedding_length": 4}
DPAM_LAYER = 20  # DPAM in the last 19 blocks: our dpam_start_layer=6 of 24
FEATURE_LAYERS = [24]
SIGMA = 4
TEMPERATURE = 0.07


def load_reference(
    repo: Path,
    clip_state_dict: Mapping[str, torch.Tensor],
    prompts: Mapping[str, torch.Tensor],
    image_size: int,
    device: torch.device,
) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Build the reference model and return a function from images to ``(score (B,), map (B, 1, H, W))``.

    Args:
        repo: the reference checkout (holds ``AnomalyCLIP_lib/`` and ``prompt_ensemble.py``).
        clip_state_dict: CLIP weights with OpenAI's key names (an open_clip ``CLIP``'s state dict).
        prompts: our prompt tensors (``normal_context``, ``abnormal_context``, ``text_tokens.N``).
        image_size: input side in pixels.
        device: where the model runs.

    Returns:
        A function of (B, 3, image_size, image_size) images in [0, 1].
    """
    _import_path(repo)
    from AnomalyCLIP_lib.build_model import build_model
    from AnomalyCLIP_lib.model_load import compute_similarity, get_similarity_map
    from open_clip.constants import OPENAI_DATASET_MEAN as CLIP_MEAN
    from open_clip.constants import OPENAI_DATASET_STD as CLIP_STD
    from prompt_ensemble import AnomalyCLIP_PromptLearner

    model = build_model("ViT-L/14@336px", dict(clip_state_dict), DESIGN).eval()
    learner = AnomalyCLIP_PromptLearner(model, DESIGN)
    learner.load_state_dict(reference_prompt_state(prompts, learner.state_dict()), strict=False)
    model.visual.DAPM_replace(DPAM_layer=DPAM_LAYER)
    model.to(device)
    learner.to(device)
    with torch.no_grad():
        text_features = _text_features(model, learner)
    mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)

    def score(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            images = (images.to(device) - mean) / std
            image_features, patch_features = model.encode_image(images, FEATURE_LAYERS, DPAM_layer=DPAM_LAYER)
            image_features = image_features / image_features.norm(dim=-1, keepdim=True)
            probabilities = (image_features @ text_features.permute(0, 2, 1) / TEMPERATURE).softmax(-1)
            maps = []
            for patch_feature in patch_features:
                patch_feature = patch_feature / patch_feature.norm(dim=-1, keepdim=True)
                similarity, _ = compute_similarity(patch_feature, text_features[0])
                similarity_map = get_similarity_map(similarity[:, 1:, :], image_size)
                maps.append((similarity_map[..., 1] + 1 - similarity_map[..., 0]) / 2.0)
            anomaly_map = torch.stack(maps).sum(dim=0).cpu()
        smoothed = [torch.from_numpy(_gaussian_filter(one.numpy())) for one in anomaly_map]
        return probabilities[:, 0, 1].cpu(), torch.stack(smoothed).unsqueeze(1)

    return score


def reference_prompt_state(
    prompts: Mapping[str, torch.Tensor], reference_state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Our prompt tensors under the reference learner's names and shapes (inverse of ``convert_reference_state``)."""
    state = {
        "ctx_pos": prompts["normal_context"].reshape(reference_state["ctx_pos"].shape),
        "ctx_neg": prompts["abnormal_context"].reshape(reference_state["ctx_neg"].shape),
    }
    for key, tensor in prompts.items():
        if key.startswith("text_tokens."):
            state[f"compound_prompts_text.{key.removeprefix('text_tokens.')}"] = tensor
    return state


def _text_features(model: torch.nn.Module, learner: torch.nn.Module) -> torch.Tensor:
    """(1, 2, D) normalised normal/abnormal text embeddings, as the reference's test.py computes them."""
    prompts, tokenized_prompts, compound_prompts_text = learner(cls_id=None)
    text_features = model.encode_text_learn(prompts, tokenized_prompts, compound_prompts_text).float()
    text_features = torch.stack(torch.chunk(text_features, dim=0, chunks=2), dim=1)
    return text_features / text_features.norm(dim=-1, keepdim=True)


def _gaussian_filter(values: np.ndarray) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(values, sigma=SIGMA)


def _import_path(repo: Path) -> None:
    """Make the checkout importable, with stand-ins for its two unavailable imports."""
    if not (repo / "AnomalyCLIP_lib").is_dir():
        raise SystemExit(f"--reference-repo {repo}: no AnomalyCLIP_lib/ there; pass a checkout of zqhang/AnomalyCLIP.")
    sys.modules.setdefault("thop", types.SimpleNamespace(profile=None))
    try:
        from pkg_resources import packaging
    except ImportError:
        import packaging
        import packaging.version

        sys.modules["pkg_resources"] = types.SimpleNamespace(packaging=packaging)
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))

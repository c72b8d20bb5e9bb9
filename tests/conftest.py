"""Shared fixtures.

The test session runs offline: Hugging Face, torch hub and XDG caches point into a temporary
directory and the Hugging Face libraries are told not to use the network. The variables are set in
``pytest_configure`` (before any test module imports ``open_clip``/``huggingface_hub``, which read
them at import time) and kept in place by the autouse session fixture ``offline_environment``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from anomalib_anomalyclip.testing.tiny_clip import TinyClipConfig

_ENV_ROOT_KEY = pytest.StashKey[Path]()
_SAVED_ENV_KEY = pytest.StashKey[dict]()


def _offline_variables(root: Path) -> dict[str, str]:
    return {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(root / "hf_home"),
        "XDG_CACHE_HOME": str(root / "xdg_cache"),
        "TORCH_HOME": str(root / "torch_home"),
    }


def pytest_configure(config: pytest.Config) -> None:
    root = Path(tempfile.mkdtemp(prefix="anomalib-anomalyclip-tests-"))
    variables = _offline_variables(root)
    config.stash[_ENV_ROOT_KEY] = root
    config.stash[_SAVED_ENV_KEY] = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)


def pytest_unconfigure(config: pytest.Config) -> None:
    for name, value in config.stash.get(_SAVED_ENV_KEY, {}).items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    root = config.stash.get(_ENV_ROOT_KEY, None)
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def offline_environment(request: pytest.FixtureRequest) -> Iterator[Path]:
    """Keep the session offline with throw-away caches and two torch threads; yields the cache root."""
    import torch

    root = request.config.stash[_ENV_ROOT_KEY]
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in _offline_variables(root).items():
            patch.setenv(name, value)
        yield root
    torch.set_num_threads(previous_threads)


@pytest.fixture(scope="session")
def tiny_clip_config() -> TinyClipConfig:
    """Default tiny CLIP architecture (ViT-L/14@336 layout with 64-channel towers)."""
    from anomalib_anomalyclip.testing.tiny_clip import TinyClipConfig

    return TinyClipConfig()


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory: pytest.TempPathFactory, tiny_clip_config: TinyClipConfig) -> Path:
    """OpenAI-format state dict (``torch.save(state_dict)``) of ``build_tiny_clip(tiny_clip_config, seed=0)``."""
    from anomalib_anomalyclip.testing.tiny_clip import save_openai_state_dict

    path = tmp_path_factory.mktemp("tiny_clip") / "tiny_clip_openai.pt"
    return save_openai_state_dict(path, tiny_clip_config, seed=0)


@pytest.fixture(scope="session")
def tiny_prompt_path(tmp_path_factory: pytest.TempPathFactory, tiny_clip_config: TinyClipConfig) -> Path:
    """Seeded, untrained prompts in our checkpoint format for the tiny CLIP's text width."""
    import torch

    from anomalib_anomalyclip.method.prompts import PromptConfig, PromptLearner, save_prompts

    learner = PromptLearner(PromptConfig(width=tiny_clip_config.text_width), torch.Generator().manual_seed(7))
    return save_prompts(learner, tmp_path_factory.mktemp("prompts") / "tiny_prompts.pt")

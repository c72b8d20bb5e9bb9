"""Tests of the package entry point and of the offline test environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import anomalib_anomalyclip

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_version() -> None:
    assert anomalib_anomalyclip.__version__ == "0.1.0"


def test_import_is_light() -> None:
    code = (
        "import sys, anomalib_anomalyclip; "
        "heavy = [m for m in ('torch', 'open_clip', 'anomalib', 'lightning') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert result.stdout.strip() == ""


# The export extra (pyproject's [project.optional-dependencies]): a module that needs one of these may be skipped.
OPTIONAL_DEPENDENCIES = ("openvino", "onnx", "onnxscript", "nncf")

# anomalib.models first, as anomalib's tools load the package: importing some modules first in a fresh interpreter
# (callbacks, checkpoints) starts the registration hook half-way through their own import (a circular import).
_IMPORT_EVERY_MODULE = """
import importlib, json, pkgutil, sys
import anomalib.models
import anomalib_anomalyclip
optional, walked, skipped, failed = set(sys.argv[1:]), [], {}, {}
def failure(name):
    error = sys.exc_info()[1]
    missing = getattr(error, "name", None) if isinstance(error, ImportError) else None
    if missing and missing.split(".")[0] in optional:
        skipped[name] = missing
    else:
        failed[name] = repr(error)
for module in pkgutil.walk_packages(anomalib_anomalyclip.__path__, "anomalib_anomalyclip.", onerror=failure):
    walked.append(module.name)
    try:
        importlib.import_module(module.name)
    except Exception:
        failure(module.name)
bench = sorted(name for name in sys.modules if name.partition(".")[0] == "anomalyclip_bench")
print(json.dumps({"walked": walked, "skipped": skipped, "failed": failed, "bench": bench}))
"""


def test_the_library_never_imports_the_benchmark_tooling() -> None:
    """Every module of anomalib_anomalyclip imports without anomalyclip_bench (the tooling depends on the library,
    never the reverse)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_EVERY_MODULE, *OPTIONAL_DEPENDENCIES],
        capture_output=True, text=True, check=True, env=env, cwd=REPO_ROOT, timeout=600,
    )  # fmt: skip
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"anomalib_anomalyclip.method.torch_model", "anomalib_anomalyclip.testing.toy_data"} <= set(report["walked"])
    assert report["failed"] == {}
    assert report["bench"] == []


def test_public_names() -> None:
    assert "AnomalyCLIPModel" in anomalib_anomalyclip.__all__
    assert set(anomalib_anomalyclip.__all__) <= set(dir(anomalib_anomalyclip))


def test_unknown_attribute_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'NotAThing'"):
        _ = anomalib_anomalyclip.NotAThing


def test_anomaly_clip_model_is_resolved_lazily() -> None:
    torch_model = pytest.importorskip("anomalib_anomalyclip.method.torch_model")
    assert anomalib_anomalyclip.AnomalyCLIPModel is torch_model.AnomalyCLIPModel


def test_session_is_offline(offline_environment: Path) -> None:
    import huggingface_hub.constants

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert os.environ["TRANSFORMERS_OFFLINE"] == "1"
    for name in ("HF_HOME", "XDG_CACHE_HOME", "TORCH_HOME"):
        assert Path(os.environ[name]).is_relative_to(offline_environment), name
    # huggingface_hub reads the variables when it is first imported, so they must be set by then.
    assert huggingface_hub.constants.HF_HUB_OFFLINE
    assert Path(huggingface_hub.constants.HF_HOME).is_relative_to(offline_environment)


def test_torch_uses_two_threads() -> None:
    import torch

    assert torch.get_num_threads() == 2


def _fresh_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return result.stdout.strip()


def test_anomalib_resolves_the_model_by_short_name_and_class_path(tiny_clip_path: Path) -> None:
    # As anomalib's tools do: only anomalib.models is imported, never this package by name.
    code = (
        "from anomalib.models import get_model, UnknownModelError\n"
        f"args = dict(pretrained={str(tiny_clip_path)!r}, image_size=56)\n"
        "short = get_model('AnomalyCLIP', **args)\n"
        "full = get_model({'class_path': 'anomalib_anomalyclip.AnomalyCLIP', 'init_args': args})\n"
        "print(type(short).__name__, type(full) is type(short))\n"
        "try:\n"
        "    get_model('ExportedAnomalyCLIP')\n"
        "except ValueError as error:\n"
        "    print('--model.path' in str(error))"
    )
    assert _fresh_python(code).splitlines()[-2:] == ["AnomalyCLIP True", "True"]


def test_the_start_up_hook_imports_nothing_heavy() -> None:
    code = (
        "import sys\n"
        "print('anomalib_anomalyclip_hook' in sys.modules, "
        "[m for m in ('anomalib', 'torch', 'anomalib_anomalyclip', 'importlib.abc') if m in sys.modules])"
    )
    assert _fresh_python(code) == "True []"


def test_every_user_facing_error_derives_from_the_package_base_error() -> None:
    from anomalib_anomalyclip import errors

    user_errors = [getattr(errors, name) for name in errors.__all__ if name.endswith("Error")]
    assert len(user_errors) >= 10
    assert all(issubclass(error, errors.AnomalyCLIPError) for error in user_errors)
    with pytest.raises(errors.AnomalyCLIPError):
        from anomalib_anomalyclip.weights import resolve_prompt_weights

        resolve_prompt_weights("no-such-released-prompts")


def test_every_test_fixture_on_disk_is_in_git() -> None:
    """A fixture that only exists in this checkout makes CI's clean clone fail (an ignored ``*.ckpt`` once did)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")

    def listed(*options: str) -> list[str]:
        command = ["git", "ls-files", "--others", "--exclude-standard", *options, "tests/fixtures"]
        return subprocess.run(command, cwd=root, capture_output=True, text=True, check=True).stdout.split()

    outside_git = [path for path in listed() + listed("--ignored") if "__pycache__" not in path]
    assert outside_git == [], "commit these fixtures (and un-ignore them in .gitignore)"

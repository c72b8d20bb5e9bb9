"""One check before an AnomalyCLIP run of anomalib's command line: everything the run lacks, in one message.

A run needs prompts (a file, a cached download, or released prompts chosen by the data), the CLIP weights (a file
or a cached open_clip tag) and its data (a dataset folder, or the images to predict). Without this check they are
found missing one per try, each inside a long report, and anomalib tries to download a missing dataset with no
network, leaving an empty folder. :func:`missing_pieces` looks for all of them without downloading anything;
downloads are left to the run when there is a network.

The decisions mirror :func:`.prompt_plan.plan_prompts` (which prompts a run uses),
:func:`.backbone.clip_weights_problem` and :func:`.weights.prompt_weights_problem` (where each file is looked for).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anomalib_anomalyclip.method.backbone import clip_weights_problem
from anomalib_anomalyclip.weights import prompt_weights_problem, released_prompts_for_class

__all__ = ["RunRequest", "dataset_problem", "format_report", "missing_pieces"]

FITTING = {"fit", "train"}
MVTEC_LAYOUT = "<root>/<category>/{train/good, test/<good|defect>, ground_truth/<defect>}"
LAYOUTS = {
    "MVTecAD": MVTEC_LAYOUT,
    "MPDD": MVTEC_LAYOUT,
    "Visa": "<root>/split_csv/1cls.csv and <root>/<category>/Data/... (the VisA download, unpacked; anomalib "
    "writes its split to <root>/visa_pytorch/<category>)",
    "BTech": "<root>/<category>/{train/ok, test/ok, test/ko, ground_truth/ko}",
    "Kolektor": "<root>/kos01 ... kos50/Part<n>.jpg with Part<n>_label.bmp",
    "AuxiliaryDataModule": "one folder per category, each <category>/{test/<good|defect>, ground_truth/<defect>} "
    "(MVTec AD's layout; or give --data.sources, see the prompt training page of the docs)",
}
"""Expected layouts of anomalib's datamodules (as docs/benchmark.md describes them)."""


@dataclass(frozen=True)
class RunRequest:
    """What the command line asks for, before anything is built.

    Attributes:
        subcommand: ``fit``, ``test``, ``predict``, ...
        model: the model's init arguments (with the defaults filled in).
        data_class: the datamodule's class, or ``None`` (no data, or a path of images).
        data: the datamodule's init arguments, or the path of the images (``predict --data <path>``).
        ckpt_path: the checkpoint the run loads, if any (it holds the prompts).
    """

    subcommand: str
    model: Mapping[str, Any]
    data_class: type | None
    data: Mapping[str, Any] | str | None
    ckpt_path: str | None


def missing_pieces(request: RunRequest, online: bool, check_clip: bool = True) -> list[str]:
    """One line per missing piece: the prompts, the CLIP weights, the data (empty: the run can start).

    Args:
        request: what the command line asks for.
        online: whether downloads can work.
        check_clip: look for the CLIP weights (``False`` where a problem with them was reported already).
    """
    model = request.model
    prompts = _prompts_spec(request)
    clip_args = (model.get("backbone", ""), model.get("pretrained"), model.get("cache_dir"), online)
    problems = [
        prompt_weights_problem(prompts, model.get("cache_dir"), online) if prompts else None,
        clip_weights_problem(*clip_args) if check_clip else None,
        dataset_problem(request.data_class, request.data, online),
    ]
    return [problem for problem in problems if problem]


def format_report(problems: list[str]) -> str:
    """The one message of a run that lacks ``problems``."""
    lines = "\n".join(f"  {number}. {problem}" for number, problem in enumerate(problems, 1))
    count = "1 thing is" if len(problems) == 1 else f"{len(problems)} things are"
    return f"AnomalyCLIP cannot start: {count} missing.\n{lines}"


def _prompts_spec(request: RunRequest) -> str | None:
    """The ``prompt_weights`` the run will read: given, or the released ones chosen by the data; ``None``: none."""
    model = request.model
    if request.ckpt_path:
        return None  # the checkpoint holds them
    given, train_prompts = model.get("prompt_weights"), _field(model.get("training"), "learn")
    if given is not None:
        return str(given)
    wants_to_learn = not int(model.get("k_shot") or 0) and train_prompts is not False
    if request.subcommand in FITTING and wants_to_learn and not _normal_only(request.data_class):
        return None  # prompt training on labelled data
    return None if train_prompts else _released_name(request)


def _field(group: Any, name: str) -> Any:
    """A field of a model argument group as the parser gives it (a namespace, a mapping or a dataclass)."""
    if isinstance(group, Mapping):
        return group.get(name)
    return getattr(group, name, None)


def _released_name(request: RunRequest) -> str:
    return released_prompts_for_class(request.data_class or object).name


def _normal_only(data_class: type | None) -> bool:
    """Whether the datamodule's train split holds normal images only (anomalib's own datamodules)."""
    return data_class is not None and data_class.__module__.startswith("anomalib.")


def dataset_problem(data_class: type | None, data: Mapping[str, Any] | str | None, online: bool) -> str | None:
    """What is missing of the run's data (``None``: nothing, or nothing this check knows about).

    Args:
        data_class: the datamodule's class, or ``None`` when ``data`` is a path of images.
        data: the datamodule's init arguments, or the path.
        online: whether anomalib can download a missing dataset.
    """
    if isinstance(data, str | Path):
        if Path(data).exists():
            return None
        return f"the images to predict: no file or folder '{data}'. Pass an existing one with --data"
    if data_class is None or not data or data.get("root") is None:
        return None
    root, category = Path(data["root"]), data.get("category")
    folders = _dataset_folders(data_class, root, category)
    if any(_has_files(folder) for folder in folders):
        return None
    downloads = _downloads_itself(data_class)
    if downloads and online:
        return None
    layout = LAYOUTS.get(data_class.__name__, MVTEC_LAYOUT if category else None)
    what = f"{data_class.__name__}{f' ({category})' if category else ''}"
    offline = " and there is no network for anomalib to download it" if downloads else ""
    expected = f" Expected layout: {layout}." if layout else ""
    return (
        f"the dataset {what}: no data in '{folders[0]}'{offline}.{expected} Put it there, "
        "or point to yours with --data.root /path/to/dataset"
    )


def _dataset_folders(data_class: type, root: Path, category: object) -> list[Path]:
    if not isinstance(category, str) or not category:
        return [root]
    folders = [root / category]
    if data_class.__name__ == "Visa":
        folders.append(root / "visa_pytorch" / category)
    return folders


def _has_files(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def _downloads_itself(data_class: type) -> bool:
    """Whether anomalib's datamodule downloads its dataset (its module defines ``DOWNLOAD_INFO``)."""
    module = importlib.import_module(data_class.__module__)
    return hasattr(module, "DOWNLOAD_INFO")

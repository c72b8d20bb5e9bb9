"""Command lines and configuration files of this version's short switches and of the flat arguments, before parsing.

Two rewrites, made before anomalib's parser sees the arguments, for AnomalyCLIP runs only:

* the short switches: ``--model.mutual true`` and ``--model.tiling true`` stand for ``--model.mutual.enabled true``
  and ``--model.tiling.enabled true`` (and ``mutual: true`` in a configuration file);
* the flat arguments of earlier versions: runs were written as ``--model.mutual_scoring true
  --model.mutual_pool_size 50``, and ``config.yaml`` files held the same flat keys. :func:`upgrade_command_line`
  rewrites both into groups (:func:`anomalib_anomalyclip.config.upgrade`) and returns one note per old name naming
  its new spelling (the command line prints them). ``tile_size`` also switches tiling on; ``seed`` seeds the
  prompts, the choice of references and the split of pools, as it did.

A configuration file (``--config`` or ``--model`` with a file) that needs either rewrite is written anew into a
temporary folder, which the parser reads instead; the file itself is left as it is.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from anomalib_anomalyclip.config import FLAT_ARGUMENTS, SWITCHED, flat_argument_notes, is_flat, upgrade

__all__ = ["upgrade_command_line"]

PREFIX = "--model."
CONFIG_OPTIONS = ("--config", "-c", "--model")
MODEL_NAME = "AnomalyCLIP"


def upgrade_command_line(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """``args`` with switches, flat model options and configuration files upgraded, and one note per old name.

    Only runs of AnomalyCLIP are touched: a command line that names it, or a configuration file whose model it is.
    """
    notes: list[str] = []
    args = _upgrade_config_files(list(args), notes)
    if not any(_names_the_model(argument) for argument in args) and not notes:
        return args, notes
    flat = {name: value for name, value in _model_options(args) if _is_flat(name, value)}
    notes.extend(flat_argument_notes({name: _is_bool_text(value) or value for name, value in flat.items()}, PREFIX))
    rewritten: list[str] = []
    index = 0
    while index < len(args):
        name, value, width = _option_at(args, index)
        if name in SWITCHED and _is_bool_text(value):
            rewritten.extend([f"{PREFIX}{name}.enabled", value.lower()])
        elif name in flat:
            rewritten.extend(_new_options(name, value))
        else:
            rewritten.extend(args[index : index + width])
        index += width
    return rewritten, notes


def _names_the_model(argument: str) -> bool:
    """Whether ``argument`` names AnomalyCLIP (``AnomalyCLIP``, a class path, ``--model=...``; not other models)."""
    return argument.rsplit("=", 1)[-1].rsplit(".", 1)[-1] == MODEL_NAME


def _model_options(args: Sequence[str]) -> list[tuple[str, str]]:
    found = []
    index = 0
    while index < len(args):
        name, value, width = _option_at(args, index)
        index += width
        if name is not None:
            found.append((name, value))
    return found


def _option_at(args: Sequence[str], index: int) -> tuple[str | None, str, int]:
    """The model option at ``index``: its name after ``--model.``, its value, and how many items it spans."""
    argument = args[index]
    if not argument.startswith(PREFIX):
        return None, "", 1
    name, equals, value = argument[len(PREFIX) :].partition("=")
    if equals:
        return name, value, 1
    if index + 1 < len(args) and not args[index + 1].startswith("--"):
        return name, args[index + 1], 2
    return name, "", 1


def _is_flat(name: str, value: str) -> bool:
    return name in FLAT_ARGUMENTS or (name == "feature_cache" and _is_bool_text(value))


def _is_bool_text(value: str) -> bool:
    return value.lower() in ("true", "false")


def _new_options(name: str, value: str) -> list[str]:
    """The grouped options of one flat option."""
    if name == "feature_cache":
        return [f"{PREFIX}feature_cache.enabled", value]
    if name == "seed":
        derived = "0" if value.lower() in ("null", "none") else value  # a seed of None meant 0 for these
        targets = {"prompts.seed": value, "few_shot.seed": derived, "mutual.seed": derived}
        return [item for target, given in targets.items() for item in (f"{PREFIX}{target}", given)]
    if name == "tile_size":
        if value.lower() in ("null", "none"):
            return []
        return [f"{PREFIX}tiling.enabled", "true", f"{PREFIX}tiling.tile_size", value]
    return [f"{PREFIX}{FLAT_ARGUMENTS[name]}", value]


def _upgrade_config_files(args: list[str], notes: list[str]) -> list[str]:
    """``args`` with each configuration file that needs upgrading replaced by an upgraded copy."""
    upgraded = list(args)
    for index, argument in enumerate(args):
        option, equals, inline = argument.partition("=")
        if option not in CONFIG_OPTIONS or (not equals and index + 1 == len(args)):
            continue
        copy = _upgraded_copy(Path(inline if equals else args[index + 1]), notes)
        if copy is None:
            continue
        if equals:
            upgraded[index] = f"{option}={copy}"
        else:
            upgraded[index + 1] = str(copy)
    return upgraded


def _upgraded_copy(path: Path, notes: list[str]) -> Path | None:
    if path.suffix.lower() not in (".yaml", ".yml", ".json") or not path.is_file():
        return None
    content = yaml.safe_load(path.read_text())
    model_args = _model_init_args(content)
    if model_args is None or MODEL_NAME not in str(content.get("model", content)):
        return None
    flat = is_flat(model_args)
    if not flat and not any(isinstance(model_args.get(name), bool) for name in SWITCHED):
        return None
    examples = ", ".join(flat_argument_notes(model_args)[:2])
    upgraded = upgrade(model_args)
    model_args.clear()
    model_args.update(upgraded)
    copy = Path(tempfile.mkdtemp(prefix="anomalyclip-config-")) / path.name
    copy.write_text(yaml.safe_dump(content, sort_keys=False))
    if flat:
        notes.append(
            f"{path} holds the flat model arguments of earlier versions ({examples}, ...); read as groups from {copy}"
        )
    return copy


def _model_init_args(content: Any) -> dict[str, Any] | None:
    """The model's ``init_args`` in a configuration file (a whole run's, or the model's own)."""
    if not isinstance(content, dict):
        return None
    model = content.get("model", content)
    if isinstance(model, dict) and isinstance(model.get("init_args"), dict):
        return model["init_args"]
    return None

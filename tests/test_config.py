"""The model's configuration groups: a short constructor, nested arguments on the command line, checked values."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from anomalib.cli import AnomalibCLI

from anomalib_anomalyclip import AnomalyCLIP
from anomalib_anomalyclip.cli.patches import install
from anomalib_anomalyclip.config import (
    GROUPS,
    AnomalyCLIPConfig,
    ConfigurationError,
    FewShot,
    MutualScoring,
    Tiling,
    as_group,
    upgrade,
)
from anomalib_anomalyclip.errors import AnomalyCLIPError


def test_the_constructor_takes_groups_and_anomalibs_usual_names() -> None:
    parameters = inspect.signature(AnomalyCLIP.__init__).parameters
    assert len(parameters) <= 20
    for name in ("backbone", "pretrained", "image_size", "prompt_weights", "k_shot"):
        assert name in parameters
    for group in ("prompts", "training", "dpam", "few_shot", "mutual", "tiling", "feature_cache"):
        assert group in parameters


def test_the_model_help_shows_the_groups_with_their_fields(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        AnomalibCLI(["test", "--model.help", "AnomalyCLIP"])
    shown = capsys.readouterr().out
    for option in ("--model.prompts.n_ctx", "--model.training.lr", "--model.dpam.kind", "--model.few_shot.fusion",
                   "--model.mutual.enabled", "--model.mutual.fraction", "--model.mutual.pool_size",
                   "--model.tiling.enabled", "--model.tiling.working_size", "--model.feature_cache.dtype"):  # fmt: skip
        assert option in shown, option


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--model.mutual", "true"], MutualScoring(enabled=True)),
        (["--model.mutual=true", "--model.mutual.pool_size", "10"], MutualScoring(enabled=True, pool_size=10)),
        (["--model.mutual", "{enabled: true, fraction: 0.5}"], MutualScoring(enabled=True, fraction=0.5)),
        (["--model.mutual.fraction", "0.5"], MutualScoring(fraction=0.5)),
        ([], MutualScoring()),
    ],
    ids=["switch", "switch-and-field", "mapping", "field-alone-stays-off", "default-off"],
)
def test_one_short_flag_switches_mutual_scoring_on(
    flags: list[str], expected: MutualScoring, capsys: pytest.CaptureFixture
) -> None:
    install()  # as the `anomalib` command does (its main() runs before the CLI is built)
    with pytest.raises(SystemExit):
        AnomalibCLI(["test", "--model", "AnomalyCLIP", *flags, "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert as_group(MutualScoring, printed["model"]["init_args"]["mutual"], "mutual") == expected


def test_groups_refuse_unknown_fields_and_bad_values_naming_the_argument() -> None:
    with pytest.raises(ConfigurationError, match=r"mutual has no field 'fractoin'; its fields are .*fraction"):
        as_group(MutualScoring, {"fractoin": 0.2}, "mutual")
    with pytest.raises(AnomalyCLIPError, match=r"few_shot\.fusion must be one of 'mean', 'harmonic', 'few_shot'"):
        FewShot(fusion="max")
    with pytest.raises(AnomalyCLIPError, match=r"tiling\.fusion must be one of"):
        Tiling(fusion="median")
    with pytest.raises(AnomalyCLIPError, match=r"k_shot must be 0"):
        AnomalyCLIPConfig(k_shot=-2)


def test_hyper_parameters_are_plain_values_that_rebuild_the_same_configuration() -> None:
    config = AnomalyCLIPConfig.from_arguments(k_shot=2, mutual={"enabled": True, "pool_size": 20}, tiling=False)
    plain = config.hyper_parameters()
    assert plain["mutual"] == {**plain["mutual"], "enabled": True, "pool_size": 20}
    assert plain["tiling"]["enabled"] is False
    assert AnomalyCLIPConfig.from_arguments(**plain) == config
    assert upgrade(plain) == plain  # grouped values pass the upgrade unchanged


def test_each_seed_seeds_only_its_own_choice(tiny_clip_path: Path) -> None:
    def prompts_of(**arguments: object) -> list[torch.Tensor]:
        model = AnomalyCLIP(pretrained=str(tiny_clip_path), image_size=56, visualizer=False, **arguments)
        return [parameter.detach().clone() for parameter in model.model.prompt_parameters()]

    base = prompts_of()
    same = prompts_of(few_shot={"seed": 5}, mutual={"seed": 9})
    other = prompts_of(prompts={"seed": 5})
    assert all(torch.equal(a, b) for a, b in zip(base, same, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(base, other, strict=True))


def test_python_callers_of_the_flat_arguments_get_the_same_model_and_the_new_names(tiny_clip_path: Path) -> None:
    with pytest.warns(FutureWarning, match=r"mutual_pool_size is now mutual\.pool_size"):
        old = AnomalyCLIP(pretrained=str(tiny_clip_path), image_size=56, mutual_scoring=True, mutual_pool_size=12)
    new = AnomalyCLIP(pretrained=str(tiny_clip_path), image_size=56, mutual={"enabled": True, "pool_size": 12})
    assert old.config == new.config
    assert old.model.mutual == MutualScoring(enabled=True, pool_size=12)


def test_every_field_is_documented_and_the_configuration_page_is_up_to_date() -> None:
    from docstring_parser import parse

    for name, group in GROUPS.items():
        documented = [param.arg_name for param in parse(group.__doc__).params]
        assert documented == [field.name for field in dataclasses.fields(group)], name
    page = Path(__file__).parents[1] / "docs" / "configuration_tables.py"
    result = subprocess.run([sys.executable, str(page), "--check"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-500:]

"""Each command's options are declared once, as a settings model: the CLI is built from it (names, types, defaults,
choices, help), recipes validate with it, and the library refuses what it refuses."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import torch
import typer.main
from typer.testing import CliRunner

from spkprune.checkpoint import Checkpoint, save_checkpoint
from spkprune.cli import app
from spkprune.cli.options import PRESENTATION
from spkprune.bench.settings import BenchSettings
from spkprune.compact.settings import CompactSettings
from spkprune.counting.settings import FlopsSettings
from spkprune.errors import SpkpruneError
from spkprune.export.settings import ExportSettings
from spkprune.pruning.settings import ImpCommandSettings, ImpSettings
from spkprune.recipes import STAGE_TYPES
from spkprune.selection.settings import SelectionConfig, SelectTokensSettings
from spkprune.sensitivity.settings import SensitivitySettings
from spkprune.settings import cli_flag, field_meta
from spkprune.store import Store
from spkprune.training.settings import EvaluateSettings, TrainSettings

COMMANDS = {
    ("train",): TrainSettings,
    ("evaluate",): EvaluateSettings,
    ("imp",): ImpCommandSettings,
    ("select-tokens",): SelectTokensSettings,
    ("flops", "report"): FlopsSettings,
    ("export",): ExportSettings,
    ("compact",): CompactSettings,
    ("bench",): BenchSettings,
    ("sensitivity",): SensitivitySettings,
}


def _command(path):
    node = typer.main.get_command(app)
    for part in path:
        node = node.commands[part]
    return node


@pytest.mark.parametrize("path", list(COMMANDS), ids=" ".join)
def test_cli_parameters_are_the_settings_fields_and_the_display_options(path):
    settings = COMMANDS[path]
    params = {p.name: p for p in _command(path).params}
    presentation = set(params) - set(settings.model_fields)
    assert presentation <= set(PRESENTATION), presentation  # nothing declared beside the settings but display
    for name, field in settings.model_fields.items():
        param = params[name]
        meta = field_meta(settings, name)
        if meta["argument"]:
            assert param.param_type_name == "argument" and param.required
            continue
        assert cli_flag(settings, name).split("/")[0] in param.opts, name
        assert param.help == field.description
        if field.is_required():
            assert param.required, name
        elif meta["split"]:
            assert param.default == (",".join(map(str, field.default)) if field.default else None), name
        elif meta["repeat"]:
            assert list(param.default or []) == list(field.default), name
        else:
            default = str(field.default) if isinstance(field.default, Path) else field.default
            assert param.default == default, name


@pytest.mark.parametrize("path", list(COMMANDS), ids=" ".join)
def test_cli_choices_are_the_settings_literals(path):
    settings = COMMANDS[path]
    for name, field in settings.model_fields.items():
        literal = [a for a in typing.get_args(field.annotation) if typing.get_origin(a) is typing.Literal]
        if typing.get_origin(field.annotation) is typing.Literal:
            literal = [field.annotation]
        if literal:
            result = CliRunner().invoke(app, [*path, "REF", cli_flag(settings, name), "no-such-choice"])
            assert result.exit_code == 2
            for choice in typing.get_args(literal[0]):
                assert repr(choice) in result.stderr, (name, result.stderr)


def test_recipe_stage_options_are_the_same_settings():
    for stype in STAGE_TYPES.values():
        assert stype.settings in COMMANDS.values()
        for key, opt in stype.options.items():
            assert opt.field in stype.settings.model_fields


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: ImpSettings(rounds=0), "rounds: must be >= 1 (got 0)"),
        (lambda: ImpSettings(rounds=2, target=1.0), "target: must be < 1 (got 1.0)"),
        (lambda: ImpSettings(rounds=2, target=0.5, rate=0.1), "give exactly one of target and rate"),
        (lambda: ImpSettings(rounds=2, rewind="epoch:0"), "rewind: must be init, epoch:K or iter:K with K >= 1"),
        (lambda: ImpSettings(rounds=2, scope="local"), "scope: must be 'global' or 'layerwise'"),
        (lambda: SelectionConfig(keep=1.5), "keep: each keep ratio must lie in (0, 1]"),
        (lambda: SelectionConfig(init="zeros"), "init: must be 'firing-rate' or 'random'"),
        (lambda: TrainSettings(name="x", save_iter=[-5]), "save_iter: must be >= 1 (got -5)"),
        (lambda: EvaluateSettings(ref="x", batch_size=0), "batch_size: must be >= 1 (got 0)"),
        (lambda: ExportSettings(ref="x", out="o", dry_run=True), "--dry-run only apply to a push"),
    ],
)
def test_the_library_refuses_bad_settings_in_one_line(build, message):
    with pytest.raises(SpkpruneError) as caught:
        build()
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_errors_name_the_flag_on_the_command_line_and_the_key_path_in_recipes():
    with pytest.raises(SpkpruneError, match=r"^--epochs-per-round: must be >= 1 \(got 0\)$"):
        ImpCommandSettings.parse({"ref": "a", "name": "b", "epochs_per_round": 0}, style="flag")
    with pytest.raises(SpkpruneError, match=r"^stages\.ticket\.from: missing"):
        ImpCommandSettings.parse({"name": "b"}, where="stages.ticket")


def test_imp_identity_keeps_the_keys_older_stores_recorded():
    identity = ImpSettings(rounds=3).to_dict()
    assert identity == {"rounds": 3, "target": 0.9, "rate": None, "scope": "global", "exclude": [], "rewind": "init",
                        "epochs_per_round": None, "search_timesteps": None, "seed": None}


def test_store_option_reads_the_environment_through_typer(tmp_path, monkeypatch):
    save_checkpoint(Store.open(tmp_path / "from-env"), "w", "main", Checkpoint({"w": torch.ones(2)}))
    monkeypatch.setenv("SPKPRUNE_STORE", str(tmp_path / "from-env"))
    result = CliRunner().invoke(app, ["ls", "--format", "csv"])
    assert result.exit_code == 0 and "w@main" in result.stdout, result.output
    param = next(p for p in typer.main.get_command(app).params if p.name == "store")
    assert "SPKPRUNE_STORE" in (param.envvar if isinstance(param.envvar, list) else [param.envvar])
    elsewhere = CliRunner().invoke(app, ["--store", str(tmp_path / "other"), "ls", "--format", "csv"])
    assert "w@main" not in elsewhere.stdout  # --store wins over the environment


@pytest.mark.parametrize(
    "args, line",
    [
        (["imp"], "error: imp: missing argument 'REF' (see spkprune imp --help)"),
        (["imp", "x", "--name", "y", "--rounds", "abc"], "error: imp: invalid value for '--rounds'"),
        (["no-such-command"], "error: no such command 'no-such-command' (see spkprune --help)"),
        (["--bogus", "ls"], "error: no such option: --bogus (see spkprune --help)"),
        (["imp", "x", "--bogus"], "error: imp: no such option: --bogus"),
    ],
)
def test_usage_errors_are_one_line_with_exit_2(args, line):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(line), result.stderr

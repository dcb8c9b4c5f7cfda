"""Recipes: validation (key paths, exit 2), overrides, identity hashes, skip / re-run / resume, and the real pipeline."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from spkprune.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from spkprune.cli import app
from spkprune.errors import SpkpruneError
from spkprune.models.families import FAMILIES
from spkprune.recipes import STAGE_TYPES, RecipeError, load_recipe, parse_recipe, plan, run_recipe, summary_frame
from spkprune.pruning.settings import ImpCommandSettings
from spkprune.recipes import stages
from spkprune.recipes.record import RunRecord
from spkprune.store import Store

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "recipes").glob("*.yaml"))

TINY = """
name: tiny
model: spikformer-2-64-digits
data: {dataset: digits}
seed: 3
vars: {keep: 0.7, sparsity: 0.5}
stages:
  dense: {type: train, epochs: 1}
  ticket: {type: imp, from: dense, rounds: 2, target: "${vars.sparsity}", epochs_per_round: 1}
  selected: {type: select-tokens, from: ticket, keep: "${vars.keep}", epochs: 1, teacher: dense}
  evaluate: {type: evaluate, from: selected}
  flops: {type: flops, from: selected, batches: 1}
  export: {type: export, from: selected, format: sparse, out: "${vars.out}"}
"""


def tiny(tmp_path: Path, overrides: list[str] | None = None, text: str = TINY):
    return parse_recipe(text, where="tiny.yaml", overrides=[f"vars.out={tmp_path / 'export'}", *(overrides or [])])


def error_of(text: str, overrides: list[str] | None = None) -> str:
    with pytest.raises(RecipeError) as err:
        parse_recipe(text, where="r.yaml", overrides=overrides)
    return str(err.value)


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.stages, path
    header = path.read_text().splitlines()[:6]
    assert any("Hardware" in line for line in header) and any("Time" in line for line in header), path


def test_shipped_recipes_include_the_demo_and_the_paper():
    names = {p.name for p in SHIPPED}
    assert {
        "digits-quick.yaml", "cifar10-sparsespikformer.yaml", "cifar100-sparsespikformer.yaml",
        "cifar10dvs-sparsespikformer.yaml", "dvs128-sparsespikformer.yaml", "imagenet-spikformer-8-512.yaml",
    } <= names


def test_digits_quick_is_the_documented_pipeline():
    recipe = load_recipe(ROOT / "recipes" / "digits-quick.yaml")
    assert [s.type.name for s in recipe.stages] == ["train", "imp", "select-tokens", "evaluate", "flops", "export"]
    ticket = recipe.stage("ticket")
    assert (ticket.options["rounds"], ticket.options["target"]) == (10, 0.9)
    assert recipe.stage("selected").options["keep"] == 0.7
    assert recipe.stage("selected").options["from"] == "digits-quick-ticket@round-10"
    assert recipe.stage("export").options["format"] == "sparse"


@pytest.mark.parametrize(
    "edit, expected",
    [
        ({"stages.dense.epoch": 3}, "stages.dense.epoch: unknown option for stage type train (did you mean 'epochs'?)"),
        ({"stages.dense.epochs": "ten"}, "stages.dense.epochs: must be an integer (got 'ten')"),
        ({"stages.dense.epochs": 0}, "stages.dense.epochs: must be >= 1 (got 0)"),
        ({"stages.ticket.target": 1.5}, "stages.ticket.target: must be < 1 (got 1.5)"),
        ({"stages.ticket.scope": "local"}, "stages.ticket.scope: must be 'global' or 'layerwise' (got 'local')"),
        ({"stages.ticket.from": "dnese"}, "stages.ticket.from: 'dnese' is not an earlier stage (did you mean 'dense'?)"),
        ({"stages.ticket.from": "flops"}, "stages.ticket.from: 'flops': stage 'flops' comes later in the recipe"),
        ({"stages.dense.type": "trian"}, "stages.dense.type: unknown stage type 'trian' (did you mean 'train'?)"),
        ({"stages.dense.resume": True}, "stages.dense.resume: is not a recipe option"),
        ({"modle": "x"}, "modle: unknown key (did you mean 'model'?)"),
        ({"model": "spikformer-9-9"}, "model: unknown model preset 'spikformer-9-9'"),
        ({"data.dataset": "mnist"}, "data.dataset: unknown dataset 'mnist'"),
        ({"stages.selected.keep": "${vars.kep}"}, "stages.selected.keep: unknown variable ${vars.kep} (did you mean 'keep'?)"),
        ({"stages.selected.keep": "${stages.export.ref}"}, "stage 'export' comes later"),
        ({"stages.ticket.from": None}, "stages.ticket.from: missing; expected the stage this one reads"),
    ],
)
def test_bad_recipes_name_the_key_path(edit, expected):
    raw = yaml.safe_load(TINY)
    for path, value in edit.items():
        node = raw
        *parents, last = path.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    message = error_of(yaml.safe_dump(raw, sort_keys=False), ["vars.out=/tmp/x"])
    assert message.startswith("r.yaml: ") and expected in message, message


def test_cli_reports_recipe_errors_on_one_line_with_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.replace("epochs: 1}", "epochs: many}", 1))
    result = CliRunner().invoke(app, ["--store", str(tmp_path / "s"), "run", str(bad), "--dry-run"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines() if hasattr(result, "stderr") else result.output.strip().splitlines()
    assert lines == [f"error: {bad}: stages.dense.epochs: must be an integer (got 'many')"]
    assert not (tmp_path / "s").exists()  # validation happens before anything touches the store


def test_missing_recipe_file_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="no recipe file"):
        load_recipe(tmp_path / "nope.yaml")
    assert "line 3, column 1" in error_of("stages:\n  a: [b\n")
    assert error_of("model: spikformer-2-64-digits\n") == "r.yaml: stages: missing; expected a mapping of named stages (train, imp, ...)"


# ------------------------------------------------------------------------------------------------ overrides
def test_overrides_are_typed_by_the_schema(tmp_path):
    recipe = tiny(tmp_path, ["imp.rounds=5", "seed=1", "vars.keep=0.5", "selected.scorer=random", "dense.lr=1e-3"])
    ticket, selected = recipe.stage("ticket"), recipe.stage("selected")
    assert ticket.options["rounds"] == 5 and isinstance(ticket.options["rounds"], int)
    assert ticket.output_ref == "tiny-ticket@round-5" and selected.options["from"] == "tiny-ticket@round-5"
    assert selected.options["keep"] == 0.5 and selected.options["scorer"] == "random"
    assert recipe.stage("dense").options["lr"] == 0.001  # YAML 1.1 would have read 1e-3 as a string
    assert recipe.seed == 1 and {recipe.stage(s).options["seed"] for s in ("dense", "ticket", "selected")} == {1}
    assert recipe.resolved["stages"]["ticket"]["rounds"] == 5


@pytest.mark.parametrize(
    "override, expected",
    [
        ("imp.rounds=five", "stages.ticket.rounds: must be an integer (got 'five')"),
        ("imp.roundz=5", "stages.ticket.roundz: unknown option for stage type imp (did you mean 'rounds'?)"),
        ("foo.bar=1", "override 'foo.bar=1': 'foo' is not a recipe key, a stage name or a stage type"),
        ("seed", "override 'seed': expected key=value"),
        ("seed.x=1", "override 'seed.x=1': seed is a single value"),
    ],
)
def test_bad_overrides(override, expected):
    assert expected in error_of(TINY, ["vars.out=/tmp/x", override])


def test_type_shorthand_must_name_one_stage():
    text = TINY.replace("  evaluate: {type: evaluate, from: selected}",
                        "  eval1: {type: evaluate, from: selected}\n  eval2: {type: evaluate, from: ticket}")
    message = error_of(text, ["vars.out=/x", "evaluate.dataset=digits"])
    assert "several stages have type 'evaluate' (eval1, eval2); name the stage instead" in message
    recipe = parse_recipe(text, overrides=["vars.out=/x", "eval2.dataset=digits", "stages.eval1.data_dir=/d"])
    assert recipe.stage("eval2").options["dataset"] == "digits" and recipe.stage("eval1").options["data_dir"] == "/d"


# ------------------------------------------------------------------------------------------------ identity
def test_hashes_are_deterministic_and_changes_flow_downstream_only(tmp_path):
    base = {s.name: s.hash for s in tiny(tmp_path).stages}
    assert base == {s.name: s.hash for s in tiny(tmp_path).stages}
    assert len(set(base.values())) == len(base)
    changed = {s.name: s.hash for s in tiny(tmp_path, ["imp.rounds=3"]).stages}
    assert changed["dense"] == base["dense"]
    assert all(changed[name] != base[name] for name in ("ticket", "selected", "evaluate", "flops", "export"))
    keep = {s.name: s.hash for s in tiny(tmp_path, ["vars.keep=0.5"]).stages}
    assert [n for n in base if keep[n] != base[n]] == ["selected", "evaluate", "flops", "export"]


def test_output_names_are_not_identity(tmp_path):
    base = {s.name: s.hash for s in tiny(tmp_path).stages}
    renamed = tiny(tmp_path, ["dense.name=other", f"export.out={tmp_path / 'elsewhere'}"])
    assert {s.name: s.hash for s in renamed.stages} == base
    assert renamed.stage("ticket").options["from"] == "other@main"


def test_interpolated_stage_refs_are_dependencies(tmp_path):
    text = TINY.replace("teacher: dense", 'teacher: "${stages.dense.ref}"')
    recipe = tiny(tmp_path, text=text)
    selected = recipe.stage("selected")
    assert selected.options["teacher"] == "tiny-dense@main" and "dense" in selected.deps
    assert selected.hash == tiny(tmp_path).stage("selected").hash


def test_stage_tags_and_external_refs(tmp_path):
    text = TINY.replace("from: ticket, keep", "from: ticket@round-1, keep")
    assert tiny(tmp_path, text=text).stage("selected").options["from"] == "tiny-ticket@round-1"
    external = TINY.replace("from: dense, rounds", "from: hf://org/dense, rounds")
    recipe = tiny(tmp_path, text=external)
    assert recipe.stage("ticket").deps == [] and recipe.stage("ticket").options["from"] == "hf://org/dense"


# ------------------------------------------------------------------------------------------ runner (fake commands)
class FakeLibrary:
    """Stands in for the library calls the stages make: writes what each real call writes, returns result objects
    shaped like the real ones, and records every call with the settings it got."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, object]] = []
        self.fail_on: str | None = None
        for attr, kind in (("train_job", "train"), ("run_imp_command", "imp"), ("select_tokens_job", "select-tokens"),
                           ("evaluate_job", "evaluate"), ("flops_report", "flops"), ("export_job", "export")):
            monkeypatch.setattr(stages, attr, self._call(kind))

    def _call(self, kind):
        def call(*args, **kwargs):
            store, settings = (args[1], args[0]) if kind == "flops" else (args[0], args[1])
            self.calls.append((kind, settings))
            if self.fail_on == kind:
                raise KeyboardInterrupt
            return getattr(self, kind.replace("-", "_"))(store, settings)

        return call

    @property
    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.calls]

    def train(self, store, s):
        for tag, top1 in (("init", 0.1), ("main", 0.95)):
            _save(store, s.name, tag, 0.0, top1, replace=s.resume)
        return SimpleNamespace(artifact=store.resolve(f"{s.name}@main"))

    def imp(self, store, s):
        rows = []
        for k in range(s.rounds + 1):
            if not store.exists(s.name, f"round-{k}"):
                _save(store, s.name, f"round-{k}", k / s.rounds * s.target, 0.9)
            rows.append(SimpleNamespace(round=k, kind="ticket", ref=f"{s.name}@round-{k}", sparsity_prunable=k / s.rounds,
                                        top1=0.9))
        return SimpleNamespace(rows=rows, plot=Path("p.png"))

    def select_tokens(self, store, s):
        _save(store, s.name, "main", 0.5, 0.93, selector={"keep": s.keep}, replace=s.overwrite)
        return SimpleNamespace(artifact=store.resolve(f"{s.name}@main"), result=SimpleNamespace(metrics={"top1": 0.93}),
                               tokens_per_block=[16, 11], analysis=None)

    def evaluate(self, store, s):
        return {"top1": 0.93, "top5": 1.0, "loss": 0.3, "tokens_per_block": [16, 11]}

    def flops(self, store, s):
        return {"totals": {"dense_macs": 100, "nonzero_macs": 40, "sops": 7, "energy_mj": 2e-6},
                "tokens_per_block": [16, 11], "num_tokens": 16}

    def export(self, store, s):
        s.out.mkdir(parents=True, exist_ok=s.overwrite)
        (s.out / "model.sparse.safetensors").write_bytes(b"x" * 10)
        (s.out / "README.md").write_text(json.dumps(load_checkpoint(s.ref, store).meta["recipe"]))
        return SimpleNamespace(export=SimpleNamespace(folder=s.out))


def _save(store, name, tag, sparsity, top1, selector=None, replace=False):
    ckpt = Checkpoint({"w": torch.ones(2)}, {}, {"metrics": {"top1": top1}, "sparsity": {"prunable": sparsity},
                                                 "selector": selector})
    save_checkpoint(store, name, tag, ckpt, replace=replace)


def test_run_skips_finished_stages_and_stamps_the_recipe(tmp_path, monkeypatch):
    fake = FakeLibrary(monkeypatch)
    recipe = tiny(tmp_path)
    store_dir = tmp_path / "store"
    report = run_recipe(recipe, store_dir)
    assert fake.kinds == ["train", "imp", "select-tokens", "evaluate", "flops", "export"]
    assert fake.calls[1][1] == ImpCommandSettings(ref="tiny-dense@main", name="tiny-ticket", rounds=2, target=0.5,
                                                  epochs_per_round=1, seed=3)
    store = Store.open(store_dir)
    for ref in ("tiny-dense@main", "tiny-dense@init", "tiny-ticket@round-2", "tiny-selected@main"):
        meta = store.resolve(ref).meta
        assert meta["recipe"] == recipe.resolved and meta["recipe_stage"]["recipe"] == "tiny", ref
    assert json.loads((tmp_path / "export" / "README.md").read_text()) == recipe.resolved
    frame = summary_frame(report).set_index("stage")
    assert frame.loc["ticket", "top1"] == 0.9 and frame.loc["selected", "tokens per block"] == "16, 11"
    assert frame.loc["flops", "MACs"] == 40 and frame.loc["flops", "tokens per block"] == "16, 11"
    assert frame.loc["evaluate", "tokens per block"] == "16, 11" and pd.isna(frame.loc["dense", "tokens per block"])
    assert frame.loc["evaluate", "top1"] == 0.93 and frame.loc["export", "size (bytes)"] > 10
    assert report.plots == ["p.png"]
    blobs = {a.ref: a.sha256 for a in store.list()}

    fake.calls.clear()
    again = run_recipe(tiny(tmp_path), store_dir)
    assert fake.calls == [] and {o.action for o in again.outcomes} == {"skip"}
    assert {a.ref: a.sha256 for a in store.list()} == blobs  # nothing changed
    assert summary_frame(again).set_index("stage").loc["evaluate", "top1"] == 0.93


def test_changed_option_reruns_that_stage_and_what_follows(tmp_path, monkeypatch):
    fake = FakeLibrary(monkeypatch)
    store_dir = tmp_path / "store"
    run_recipe(tiny(tmp_path), store_dir)
    dense_sha = Store.open(store_dir).resolve("tiny-dense@main").sha256
    fake.calls.clear()
    changed = tiny(tmp_path, ["vars.keep=0.5"])
    assert [o.action for o in plan(changed, store_dir)] == ["skip", "skip", "run", "run", "run", "run"]
    run_recipe(changed, store_dir)
    assert fake.kinds == ["select-tokens", "evaluate", "flops", "export"]
    assert fake.calls[-1][1].overwrite  # the export folder is this stage's own
    store = Store.open(store_dir)
    assert store.resolve("tiny-dense@main").sha256 == dense_sha
    assert store.resolve("tiny-selected@main").meta["selector"] == {"keep": 0.5}


def test_interrupted_stage_resumes(tmp_path, monkeypatch):
    fake = FakeLibrary(monkeypatch)
    store_dir = tmp_path / "store"
    fake.fail_on = "select-tokens"
    with pytest.raises(KeyboardInterrupt):
        run_recipe(tiny(tmp_path), store_dir)
    record = RunRecord.load(store_dir, "tiny")
    assert record.stage("ticket")["status"] == "done" and record.stage("selected")["status"] == "running"
    fake.calls.clear()
    fake.fail_on = None
    # an interrupted imp continues with --resume
    record.stages["ticket"]["status"] = "running"
    record.save()
    run_recipe(tiny(tmp_path), store_dir)
    assert fake.kinds == ["imp", "select-tokens", "evaluate", "flops", "export"]
    assert fake.calls[0][1].resume


def test_resumed_train_drops_what_the_run_already_fixed(tmp_path, monkeypatch):
    fake = FakeLibrary(monkeypatch)
    store_dir = tmp_path / "store"
    recipe = tiny(tmp_path, ["dense.init=hf://org/w"])
    fake.fail_on = "imp"
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, store_dir)
    fresh = fake.calls[0][1]
    assert (fresh.arch, fresh.init, fresh.resume) == ("spikformer-2-64-digits", "hf://org/w", False)
    record = RunRecord.load(store_dir, "tiny")
    record.stages["dense"]["status"] = "running"
    record.save()
    fake.calls.clear()
    fake.fail_on = "imp"
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, store_dir)
    resumed = fake.calls[0][1]
    assert (resumed.arch, resumed.init, resumed.resume) == (None, None, True)
    assert (resumed.dataset, resumed.name) == ("digits", "tiny-dense")


def test_run_refuses_to_overwrite_what_it_did_not_make(tmp_path, monkeypatch):
    FakeLibrary(monkeypatch)
    store_dir = tmp_path / "store"
    _save(Store.open(store_dir), "tiny-dense", "main", 0.0, 0.5)
    with pytest.raises(SpkpruneError, match="stages.dense: the store already holds tiny-dense"):
        run_recipe(tiny(tmp_path), store_dir)


def test_deleted_output_is_rebuilt(tmp_path, monkeypatch):
    fake = FakeLibrary(monkeypatch)
    store_dir = tmp_path / "store"
    run_recipe(tiny(tmp_path), store_dir)
    Store.open(store_dir).delete("tiny-selected", "main")
    fake.calls.clear()
    run_recipe(tiny(tmp_path), store_dir)
    assert fake.kinds == ["select-tokens", "evaluate", "flops", "export"]


# ------------------------------------------------------------------------------------------ CLI contract
def test_every_stage_option_is_a_cli_option_of_the_same_command():
    """Recipes and the CLI read one settings declaration: each stage option is the same command's CLI parameter."""
    import typer.main

    group = typer.main.get_command(app)
    commands = {"flops": group.commands["flops"].commands["report"]}
    for stype in STAGE_TYPES.values():
        node = commands.get(stype.name) or group.commands[stype.name]
        cli = {p.name: p for p in node.params}
        for key, opt in stype.options.items():
            assert opt.field in cli, f"{stype.name}: recipe option {key} is not a CLI parameter"
            param = cli[opt.field]
            if not param.required and not opt.info.is_required() and not isinstance(opt.info.default, tuple):
                default = opt.info.default
                assert param.default == (str(default) if isinstance(default, Path) else default), (stype.name, key)


@pytest.mark.slow
def test_tiny_pipeline_end_to_end(tmp_path):
    torch.set_num_threads(1)
    store_dir = tmp_path / "store"
    args = ["--store", str(store_dir), "run", "-", "--format", "json"]
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    args[3] = str(path)
    runner = CliRunner()
    result = runner.invoke(app, [*args, f"vars.out={tmp_path / 'export'}"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    rows = {row["stage"]: row for row in doc["rows"]}
    assert rows["ticket"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert rows["export"]["size (bytes)"] > 0 and (tmp_path / "export" / "README.md").is_file()
    again = runner.invoke(app, [*args, f"vars.out={tmp_path / 'export'}"])
    assert again.exit_code == 0 and {r["status"] for r in json.loads(again.stdout)["rows"]} == {"skipped"}


def test_flops_stage_calls_the_library_like_the_command(tmp_path):
    settings = STAGE_TYPES["flops"].build({"from": "spikformer-2-64-digits", "keep": "0.5"})
    result = stages.run_flops(None, settings, progress=False, log=lambda m: None)
    assert result["tokens"] == "16, 8" and result["dense_macs"] > 0
    cli = CliRunner().invoke(app, ["--store", str(tmp_path / "s"), "flops", "report", "spikformer-2-64-digits",
                                   "--keep", "0.5", "--format", "json"])
    assert json.loads(cli.stdout)["totals"]["dense_macs"] == result["dense_macs"]


@pytest.mark.parametrize("capability, stage, command", [
    ("token_selection", "selected", "select-tokens"), ("counted", "flops", "flops report"),
])
def test_a_stage_its_family_cannot_run_fails_before_any_stage_runs(tmp_path, monkeypatch, capability, stage, command):
    able = {"counted": True, "token_selection": True, capability: False}
    monkeypatch.setitem(FAMILIES, "sdt", dataclasses.replace(FAMILIES["sdt"], **able))
    fake = FakeLibrary(monkeypatch)
    with pytest.raises(RecipeError) as err:
        run_recipe(tiny(tmp_path, ["model=sdt-2-64-digits"]), tmp_path / "store")
    assert f"stages.{stage}: {command} does not work on the sdt family yet" in str(err.value)
    assert fake.calls == [] and not RunRecord.load(tmp_path / "store", "tiny").stages


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.data_dir=/no/such/dir"], "stages.dense.data_dir: folder /no/such/dir does not exist"),
        (["dense.init=./missing.safetensors"], "stages.dense.init: ./missing.safetensors does not exist"),
        (["selected.teacher=gone@main"], "stages.selected.teacher: gone@main is not in the store"),
        (["data.dataset=cifar10", "model=spikformer-4-384-cifar10"], "data set cifar10 is read from local files"),
    ],
)
def test_missing_inputs_fail_before_any_stage_runs(tmp_path, monkeypatch, overrides, message):
    fake = FakeLibrary(monkeypatch)
    with pytest.raises(RecipeError, match=message):
        run_recipe(tiny(tmp_path, overrides), tmp_path / "store")
    assert fake.calls == [] and not RunRecord.load(tmp_path / "store", "tiny").stages

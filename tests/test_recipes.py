"""Recipes: validation (key paths, exit 2), overrides, identity hashes, skip / re-run / resume, and the real pipeline."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from spkprune.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from spkprune.cli import app
from spkprune.errors import SpkpruneError
from spkprune.recipes import STAGE_TYPES, RecipeError, load_recipe, parse_recipe, plan, run_recipe, summary_frame
from spkprune.recipes import stages as adapters
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
        ({"stages.dense.epochs": "ten"}, "stages.dense.epochs: expected an integer >= 1, got 'ten'"),
        ({"stages.dense.epochs": 0}, "stages.dense.epochs: expected an integer >= 1, got 0"),
        ({"stages.ticket.target": 1.5}, "stages.ticket.target: expected a number in [0, 1], got 1.5"),
        ({"stages.ticket.scope": "local"}, "stages.ticket.scope: expected one of global, layerwise, got 'local'"),
        ({"stages.ticket.from": "dnese"}, "stages.ticket.from: 'dnese' is not an earlier stage (did you mean 'dense'?)"),
        ({"stages.ticket.from": "flops"}, "stages.ticket.from: 'flops': stage 'flops' comes later in the recipe"),
        ({"stages.dense.type": "trian"}, "stages.dense.type: unknown stage type 'trian' (did you mean 'train'?)"),
        ({"stages.dense.resume": True}, "stages.dense.resume: is set by the runner"),
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
    assert lines == [f"error: {bad}: stages.dense.epochs: expected an integer >= 1, got 'many'"]
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
        ("imp.rounds=five", "stages.ticket.rounds: expected an integer >= 1, got 'five'"),
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
class FakeCommands:
    """Stands in for the stage commands: writes what each real command writes, and counts invocations."""

    def __init__(self, monkeypatch):
        self.calls: list[list[str]] = []
        self.fail_on: str | None = None
        monkeypatch.setattr(adapters, "invoke", self)

    def __call__(self, argv: list[str], store_dir: Path) -> str:
        self.calls.append(argv)
        if self.fail_on == argv[0]:
            raise KeyboardInterrupt
        store = Store.open(store_dir)
        opts = _opts(argv)
        kind = argv[0]
        if kind == "train":
            for tag, top1 in (("init", 0.1), ("main", 0.95)):
                _save(store, opts["--name"], tag, 0.0, top1, replace="--resume" in argv)
        elif kind == "imp":
            rounds = int(opts["--rounds"])
            rows = []
            for k in range(rounds + 1):
                if not store.exists(opts["--name"], f"round-{k}"):
                    _save(store, opts["--name"], f"round-{k}", k / rounds * float(opts["--target"]), 0.9)
                rows.append({"round": k, "kind": "ticket", "sparsity_prunable": k / rounds, "top1": 0.9})
            return json.dumps({"final": f"{opts['--name']}@round-{rounds}", "rows": rows, "plot": "p.png"})
        elif kind == "select-tokens":
            _save(store, opts["--name"], "main", 0.5, 0.93, selector={"keep": float(opts["--keep"])})
            return json.dumps({"student_top1": 0.93, "rows": [{"block": 0, "tokens": 16}, {"block": 1, "tokens": 11}]})
        elif kind == "evaluate":
            return json.dumps({"top1": 0.93, "top5": 1.0, "loss": 0.3, "tokens_per_block": [16, 11]})
        elif kind == "flops":
            return json.dumps({"totals": {"dense_macs": 100, "nonzero_macs": 40, "sops": 7, "energy_mj": 2e-6},
                               "tokens_per_block": [16, 11], "num_tokens": 16})
        elif kind == "export":
            out = Path(opts["--out"])
            out.mkdir(parents=True, exist_ok="--overwrite" in argv)
            (out / "model.sparse.safetensors").write_bytes(b"x" * 10)
            (out / "README.md").write_text(json.dumps(load_checkpoint(argv[1], store).meta["recipe"]))
        return ""


def _opts(argv: list[str]) -> dict[str, str]:
    return {a: b for a, b in zip(argv, argv[1:] + [""]) if a.startswith("--")}


def _save(store, name, tag, sparsity, top1, selector=None, replace=False):
    ckpt = Checkpoint({"w": torch.ones(2)}, {}, {"metrics": {"top1": top1}, "sparsity": {"prunable": sparsity},
                                                 "selector": selector})
    save_checkpoint(store, name, tag, ckpt, replace=replace)


def test_run_skips_finished_stages_and_stamps_the_recipe(tmp_path, monkeypatch):
    fake = FakeCommands(monkeypatch)
    recipe = tiny(tmp_path)
    store_dir = tmp_path / "store"
    report = run_recipe(recipe, store_dir)
    assert [c[0] for c in fake.calls] == ["train", "imp", "select-tokens", "evaluate", "flops", "export"]
    assert fake.calls[1] == ["imp", "tiny-dense@main", "--name", "tiny-ticket", "--rounds", "2", "--target", "0.5",
                             "--epochs-per-round", "1", "--seed", "3", "--format", "json", "--no-progress"]
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
    fake = FakeCommands(monkeypatch)
    store_dir = tmp_path / "store"
    run_recipe(tiny(tmp_path), store_dir)
    dense_sha = Store.open(store_dir).resolve("tiny-dense@main").sha256
    fake.calls.clear()
    changed = tiny(tmp_path, ["vars.keep=0.5"])
    assert [o.action for o in plan(changed, store_dir)] == ["skip", "skip", "run", "run", "run", "run"]
    run_recipe(changed, store_dir)
    assert [c[0] for c in fake.calls] == ["select-tokens", "evaluate", "flops", "export"]
    assert "--overwrite" in fake.calls[-1]  # the export folder is this stage's own
    store = Store.open(store_dir)
    assert store.resolve("tiny-dense@main").sha256 == dense_sha
    assert store.resolve("tiny-selected@main").meta["selector"] == {"keep": 0.5}


def test_interrupted_stage_resumes(tmp_path, monkeypatch):
    fake = FakeCommands(monkeypatch)
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
    assert [c[0] for c in fake.calls] == ["imp", "select-tokens", "evaluate", "flops", "export"]
    assert "--resume" in fake.calls[0]


def test_resumed_train_drops_what_the_run_already_fixed(tmp_path):
    dense = tiny(tmp_path, ["dense.init=hf://org/w"]).stage("dense")
    fresh, resumed = adapters.argv_for(dense), adapters.argv_for(dense, resume=True)
    assert fresh[:3] == ["train", "--arch", "spikformer-2-64-digits"] and "--init" in fresh
    assert "--arch" not in resumed and "--init" not in resumed and resumed[-1] == "--resume"
    assert resumed[1:3] == ["--dataset", "digits"]


def test_run_refuses_to_overwrite_what_it_did_not_make(tmp_path, monkeypatch):
    FakeCommands(monkeypatch)
    store_dir = tmp_path / "store"
    _save(Store.open(store_dir), "tiny-dense", "main", 0.0, 0.5)
    with pytest.raises(SpkpruneError, match="stages.dense: the store already holds tiny-dense"):
        run_recipe(tiny(tmp_path), store_dir)


def test_deleted_output_is_rebuilt(tmp_path, monkeypatch):
    fake = FakeCommands(monkeypatch)
    store_dir = tmp_path / "store"
    run_recipe(tiny(tmp_path), store_dir)
    Store.open(store_dir).delete("tiny-selected", "main")
    fake.calls.clear()
    run_recipe(tiny(tmp_path), store_dir)
    assert [c[0] for c in fake.calls] == ["select-tokens", "evaluate", "flops", "export"]


# ------------------------------------------------------------------------------------------ CLI contract
def test_schema_matches_the_cli_commands():
    import typer.main

    group = typer.main.get_command(app)
    for stype in STAGE_TYPES.values():
        node = group
        for part in stype.command:
            node = node.commands.get(part) if hasattr(node, "commands") else None
            if node is None:
                pytest.fail(f"spkprune has no command {' '.join(stype.command)}")
        cli = {p.name for p in node.params if p.name not in ("ctx",)}
        ours = {("ref" if key == stype.positional else key) for key in stype.options} | set(stype.managed)
        renamed = {"fmt": "format"}
        cli = {renamed.get(name, name) for name in cli}
        unknown = ours - cli
        assert not unknown, f"{stype.name}: recipe options the CLI lacks: {sorted(unknown)}"


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


def test_invoke_runs_the_real_command_in_process(tmp_path):
    out = adapters.invoke(["flops", "report", "spikformer-2-64-digits", "--keep", "0.5", "--format", "json"], tmp_path)
    doc = json.loads(out)
    assert doc["tokens_per_block"] == [16, 8] and doc["totals"]["dense_macs"] > 0
    Store.open(tmp_path / "s")
    with pytest.raises(SpkpruneError, match=f"no artifact named 'x': store {tmp_path / 's'} is empty"):
        adapters.invoke(["evaluate", "x@main"], tmp_path / "s")  # the stage's own store, not ./spkprune-store
    with pytest.raises(SpkpruneError, match="No such option: --bogus"):
        adapters.invoke(["evaluate", "x@main", "--bogus"], tmp_path)

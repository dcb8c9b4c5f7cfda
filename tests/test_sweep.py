"""Sweeps: grid expansion (shared parents, names, hashes), validation, `--jobs` workers, and the sweep report."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from spkprune.cli import app
from spkprune.errors import SpkpruneError
from spkprune.recipes import RecipeError, load_recipe, parse_recipe, run_recipe
from spkprune.recipes.record import RunRecord
from spkprune.recipes.sweep import MAX_POINTS, SweepRecipe
from spkprune.recipes.sweep_report import sweep_report
from spkprune.recipes.worker import _Pool, _Worker, run_in_workers
from spkprune.store import Store
from test_recipes import FakeLibrary, _save

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

GRID = """
name: grid
model: spikformer-2-64-digits
data: {dataset: digits}
seed: 3
vars: {keep: 0.7}
sweep:
  ticket.target: [0.5, 0.8]
  vars.keep: [0.5, 1.0]
stages:
  dense: {type: train, epochs: 1}
  ticket: {type: imp, from: dense, rounds: 2, target: 0.5, epochs_per_round: 1}
  selected: {type: select-tokens, from: ticket, keep: "${vars.keep}", epochs: 1, teacher: dense}
  flops: {type: flops, from: selected, batches: 1}
"""
PLAIN = GRID.replace("sweep:\n  ticket.target: [0.5, 0.8]\n  vars.keep: [0.5, 1.0]\n", "")
DISTINCT = {"train": 1, "imp": 2, "select-tokens": 4, "flops": 4}


def grid(overrides: list[str] | None = None, text: str = GRID) -> SweepRecipe:
    return parse_recipe(text, where="grid.yaml", default_name="grid", overrides=overrides)


def error_of(sweep: dict | None, overrides: list[str] | None = None) -> str:
    raw = yaml.safe_load(GRID)
    raw["sweep"] = sweep
    with pytest.raises(RecipeError) as err:
        parse_recipe(yaml.safe_dump(raw, sort_keys=False), where="r.yaml", overrides=overrides)
    return str(err.value)


# ------------------------------------------------------------------------------------------------- expansion
def test_points_share_their_common_parents():
    recipe = grid()
    names = [stage.name for stage in recipe.stages]
    assert names == [
        "dense", "ticket-target0.5", "ticket-target0.8",
        "selected-target0.5-keep0.5", "selected-target0.5-keep1.0", "selected-target0.8-keep0.5",
        "selected-target0.8-keep1.0",
        "flops-target0.5-keep0.5", "flops-target0.5-keep1.0", "flops-target0.8-keep0.5", "flops-target0.8-keep1.0",
    ]
    assert len({stage.hash for stage in recipe.stages}) == len(names)
    assert len({stage.artifact for stage in recipe.stages if stage.artifact}) == 7
    selected = recipe.stage("selected-target0.8-keep0.5")
    assert selected.deps == ["ticket-target0.8", "dense"] and selected.options["keep"] == 0.5
    assert selected.options["from"] == "grid-ticket-target0.8@round-2"
    assert selected.options["teacher"] == "grid-dense@main"
    assert selected.artifact == "grid-selected-target0.8-keep0.5" and selected.output_ref == f"{selected.artifact}@main"
    assert recipe.stage("flops-target0.8-keep0.5").options["from"] == selected.output_ref
    assert [point.values for point in recipe.points] == [
        {"ticket.target": t, "vars.keep": k} for t in (0.5, 0.8) for k in (0.5, 1.0)
    ]
    assert recipe.points[2].stages == {"dense": "dense", "ticket": "ticket-target0.8",
                                       "selected": "selected-target0.8-keep0.5", "flops": "flops-target0.8-keep0.5"}
    assert recipe.resolved["sweep"] == {"ticket.target": [0.5, 0.8], "vars.keep": [0.5, 1.0]}
    assert list(recipe.resolved["stages"]) == names


def test_a_point_is_the_plain_recipe_with_its_values():
    """Each expanded stage has the identity hash the plain recipe gives it at that point, so it is the same stage."""
    recipe = grid()
    for point in recipe.points:
        plain = parse_recipe(PLAIN, overrides=[f"ticket.target={point.values['ticket.target']}",
                                               f"vars.keep={point.values['vars.keep']}"])
        for name, expanded in point.stages.items():
            assert recipe.stage(expanded).hash == plain.stage(name).hash, (point.values, name)
    assert {s.name: s.hash for s in grid().stages} == {s.name: s.hash for s in recipe.stages}  # deterministic


def test_sweep_overrides_narrow_or_add_axes():
    narrowed = grid(["sweep.vars.keep=[0.5]"])
    assert [s.name for s in narrowed.stages if s.type.name == "select-tokens"] == [
        "selected-target0.5", "selected-target0.8"]  # one keep value changes no stage apart
    added = parse_recipe(PLAIN, overrides=["sweep.selected.epochs=[1, 2]"])
    assert isinstance(added, SweepRecipe) and len(added.points) == 2
    assert [s.name for s in added.stages][:2] == ["dense", "ticket"]
    message = error_of({"selected.keep": [0.5, 1.0]}, ["selected.keep=0.5"])
    assert message == "override 'selected.keep=0.5': selected.keep is swept; override the grid instead: " \
                      "sweep.selected.keep=[0.5]"


def test_a_plain_recipe_loads_as_before():
    recipe = load_recipe(ROOT / "recipes" / "digits-quick.yaml")
    assert not isinstance(recipe, SweepRecipe) and "sweep" not in recipe.resolved


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "sweep, expected",
    [
        ({}, "r.yaml: sweep: empty; give at least one KEY: [values]"),
        ([0.5], "r.yaml: sweep: expected a mapping of KEY: [values], got a list"),
        ({"ticket.target": []}, "r.yaml: sweep.ticket.target: expected a non-empty list of values, got a list"),
        ({"ticket.target": 0.5}, "r.yaml: sweep.ticket.target: expected a non-empty list of values, got a number"),
        ({"ticket.target": [0.5, 0.5]}, "r.yaml: sweep.ticket.target: a value is listed twice"),
        ({"ticket.targett": [0.5]},
         "r.yaml: sweep.ticket.targett: unknown option for stage type imp (did you mean 'target'?)"),
        ({"ticket.name": ["a", "b"]}, "r.yaml: sweep.ticket.name: name is an output name or display option"),
        ({"ticket.type": ["imp"]}, "r.yaml: sweep.ticket.type: a stage's type cannot be swept"),
        ({"tiket.target": [0.5]}, "r.yaml: sweep.tiket.target: 'tiket' is not a recipe key, a stage name or a stage"),
        ({"ticket": [0.5]}, "r.yaml: sweep.ticket: expected STAGE.OPTION"),
        ({"vars.kep": [0.5]}, "r.yaml: sweep.vars.kep: no variable 'kep' (did you mean 'keep'?); declare it under"),
        ({"name": ["a", "b"]}, "r.yaml: sweep.name: cannot be swept; sweep stage options, vars.NAME, seed or model"),
        ({"ticket.target": [0.5, 1.5]}, "r.yaml: sweep.ticket.target: must be < 1 (got 1.5)"),
        ({"dense.epochs": [1, "many"]}, "r.yaml: sweep.dense.epochs: must be an integer (got 'many')"),
        ({"ticket.target": [0.5], "imp.target": [0.8]}, "r.yaml: sweep.imp.target: the same option as sweep.ticket"),
        ({"ticket.target": [0.1 * i for i in range(1, 8)], "dense.epochs": list(range(1, 8)), "seed": list(range(7))},
         f"r.yaml: sweep: 343 points (7 x 7 x 7); at most {MAX_POINTS}"),
    ],
)
def test_bad_sweeps_name_the_key_path(sweep, expected):
    message = error_of(sweep)
    assert message.startswith(expected), message


def test_a_bad_value_elsewhere_names_its_point():
    message = error_of({"vars.keep": [0.5, 1.5]})
    assert message.startswith("r.yaml: stages.selected.keep: ") and message.endswith("(at sweep point vars.keep=1.5)")


def test_cli_refuses_bad_sweeps_and_jobs_on_one_line(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(GRID)
    store = tmp_path / "store"
    runner = CliRunner()
    for args, line in (
        ([str(path), "--jobs", "0"], "error: --jobs: must be >= 1 (got 0)"),
        ([str(path), "--jobs", "-3"], "error: --jobs: must be >= 1 (got -3)"),
        ([str(path), "sweep.ticket.target=[]"], f"error: {path}: sweep.ticket.target: expected a non-empty list"),
        ([str(path), "sweep.ticket.rounds=[1, 0]"], f"error: {path}: sweep.ticket.rounds: must be >= 1 (got 0)"),
    ):
        result = runner.invoke(app, ["--store", str(store), "run", *args])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(line), lines
    report = runner.invoke(app, ["--store", str(store), "sweep", "report", str(ROOT / "recipes" / "digits-quick.yaml")])
    assert report.exit_code == 2 and report.stderr.strip() == (
        "error: recipe 'digits-quick' has no sweep: section; `spkprune run` prints its summary")
    nothing = runner.invoke(app, ["--store", str(store), "sweep", "report", str(path)])
    assert nothing.exit_code == 2 and "no point of sweep 'grid' has finished" in nothing.stderr
    assert not store.exists()


# ------------------------------------------------------------------------------------- running (fake library)
class SweepFake(FakeLibrary):
    """FakeLibrary whose tickets are as sparse as their target, whose selectors' accuracy falls with sparsity x keep
    and whose energy grows with keep; every call is appended to a log file (workers are other processes)."""

    def __init__(self, patcher, log: Path, fail: str | None = None):
        self.log, self.fail = Path(log), fail
        super().__init__(patcher)

    def _call(self, kind):
        call = super()._call(kind)

        def logged(*args, **kwargs):
            settings = args[0] if kind == "flops" else args[1]
            name = getattr(settings, "name", None) or settings.ref
            with open(self.log, "a") as handle:
                handle.write(json.dumps([kind, name]) + "\n")
            if name == self.fail:
                raise SpkpruneError(f"{name} cannot be made")
            return call(*args, **kwargs)

        return logged

    def select_tokens(self, store, s):
        sparsity = store.resolve(s.ref).meta["sparsity"]["prunable"]
        top1 = round(0.99 - 0.2 * sparsity * (1 - s.keep), 4)
        _save(store, s.name, "main", sparsity, top1, selector={"keep": [s.keep]}, replace=s.overwrite)
        return SimpleNamespace(artifact=store.resolve(f"{s.name}@main"), result=SimpleNamespace(metrics={"top1": top1}),
                               tokens_per_block=[16, round(16 * s.keep)], analysis=None)

    def flops(self, store, s):
        keep = store.resolve(s.ref).meta["selector"]["keep"][0]
        return {"totals": {"dense_macs": 100, "nonzero_macs": 40, "sops": 7, "energy_mj": 1e-3 * (1 + keep)},
                "tokens_per_block": [16, round(16 * keep)], "num_tokens": 16}


def install_fake(log: str, fail: str | None) -> None:
    """What a test's worker process runs before the real worker: the fake library in place of the real one."""
    SweepFake(SimpleNamespace(setattr=setattr), Path(log), fail)


def fake_worker(log: Path, fail: str | None = None) -> tuple[str, ...]:
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_sweep; "
            f"test_sweep.install_fake({str(log)!r}, {fail!r}); "
            "from spkprune.recipes.worker import main; sys.exit(main(sys.argv[1:]))")
    return (sys.executable, "-c", code)


def calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def written(tmp_path: Path) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(GRID)
    return path


def test_jobs_2_runs_each_distinct_stage_once_and_a_second_run_skips_all(tmp_path):
    path, store, log = written(tmp_path), tmp_path / "store", tmp_path / "calls.jsonl"
    lines: list[str] = []
    report = run_in_workers(load_recipe(path), store, 2, log=lines.append, command=fake_worker(log))
    made = calls(log)
    assert {kind: sum(k == kind for k, _ in made) for kind in DISTINCT} == DISTINCT
    assert len({name for _, name in made}) == len(made)  # no stage ran twice
    assert made[0] == ["train", "grid-dense"] and {o.action for o in report.outcomes} == {"run"}
    record = RunRecord.load(store, "grid")
    assert len(record.stages) == 11 and {e["status"] for e in record.stages.values()} == {"done"}
    assert record.recipe == load_recipe(path).resolved
    stamped = Store.open(store).resolve("grid-selected-target0.8-keep0.5@main").meta["recipe_stage"]
    assert stamped["stage"] == "selected-target0.8-keep0.5" and stamped["recipe"] == "grid"
    assert sum("worker 1: process" in line or "worker 2: process" in line for line in lines) == 2
    blobs = {a.ref: a.sha256 for a in Store.open(store).list()}

    again = run_in_workers(load_recipe(path), store, 2, log=lines.append, command=fake_worker(log))
    assert len(calls(log)) == len(made) and {o.action for o in again.outcomes} == {"skip"}
    assert {a.ref: a.sha256 for a in Store.open(store).list()} == blobs


def test_a_failing_stage_stops_the_run_and_keeps_what_finished(tmp_path):
    path, store, log = written(tmp_path), tmp_path / "store", tmp_path / "calls.jsonl"
    with pytest.raises(SpkpruneError, match="stage 'ticket-target0.5' \\(imp\\) failed: grid-ticket-target0.5 cannot"):
        run_in_workers(load_recipe(path), store, 2, command=fake_worker(log, fail="grid-ticket-target0.5"))
    record = RunRecord.load(store, "grid")
    assert record.stage("dense")["status"] == "done"
    assert record.stage("ticket-target0.5")["status"] == "running"
    assert not any(kind == "select-tokens" and "target0.5" in name for kind, name in calls(log))


def test_a_bench_stage_runs_alone(tmp_path):
    recipe = parse_recipe(GRID + "  speed: {type: bench, refs: [dense, selected]}\n")
    bench = recipe.stage("speed-target0.8-keep0.5")
    assert bench.options["refs"] == ["grid-dense@main", "grid-selected-target0.8-keep0.5@main"]
    pool = _Pool(recipe, tmp_path, 2, lambda message: None, ())
    assert pool.may_start(bench) and pool.may_start(recipe.stage("dense"))
    pool.workers = [_Worker(1, None, recipe.stage("dense"))]
    assert not pool.may_start(bench) and pool.may_start(recipe.stage("ticket-target0.5"))
    pool.workers = [_Worker(1, None, bench)]
    assert not pool.may_start(recipe.stage("ticket-target0.5"))


def test_jobs_must_be_at_least_one(tmp_path):
    with pytest.raises(SpkpruneError, match=r"--jobs: must be >= 1 \(got 0\)"):
        run_in_workers(load_recipe(written(tmp_path)), tmp_path / "store", 0)
    assert not (tmp_path / "store").exists()


# ------------------------------------------------------------------------------------------------ the report
def test_report_gathers_points_and_draws_the_plots(tmp_path, monkeypatch):
    SweepFake(monkeypatch, tmp_path / "calls.jsonl")
    path, store = written(tmp_path), tmp_path / "store"
    run_recipe(load_recipe(path), store)
    report = sweep_report(load_recipe(path), store, out=tmp_path / "plots")
    frame = report.frame
    assert list(frame.columns) == [
        "ticket.target", "vars.keep", "status", "model", "top1", "sparsity", "keep", "tokens per block",
        "dense MACs", "MACs", "SOPs", "energy (mJ)", "img/s", "pareto (energy)",
    ]
    assert len(frame) == 4 and set(frame["status"]) == {"done"}
    row = frame.set_index(["ticket.target", "vars.keep"]).loc[(0.8, 0.5)]
    assert row["model"] == "grid-selected-target0.8-keep0.5@main" and row["sparsity"] == 0.8 and row["keep"] == 0.5
    assert row["top1"] == pytest.approx(0.91) and row["tokens per block"] == "16, 8" and row["MACs"] == 40
    assert frame["pareto (energy)"].tolist() == [True, True, False, False]  # target 0.5 beats 0.8 at equal energy
    assert frame["img/s"].isna().all()
    assert sorted(p.name for p in report.plots) == ["grid-heat-map.png", "grid-pareto-energy.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in report.plots)

    Store.open(store).update_meta("grid-selected-target0.5-keep0.5@main", "bench", {"throughput": 123.0})
    Store.open(store).update_meta("grid-selected-target0.5-keep1.0@main", "bench", {"throughput": 99.0})
    result = CliRunner().invoke(app, ["--store", str(store), "sweep", "report", str(path), "--format", "json",
                                      "--out", str(tmp_path / "cli-plots")])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [row["img/s"] for row in doc["rows"]] == [123.0, 99.0, None, None]
    assert sorted(Path(p).name for p in doc["plots"]) == [
        "grid-heat-map.png", "grid-pareto-energy.png", "grid-pareto-throughput.png"]
    markdown = CliRunner().invoke(app, ["--store", str(store), "sweep", "report", str(path), "--format", "md",
                                        "--no-plots"])
    assert markdown.exit_code == 0 and markdown.stdout.startswith("| ticket.target | vars.keep | status |")


def test_shipped_sweep_recipe_expands_within_bounds():
    recipe = load_recipe(ROOT / "recipes" / "digits-sweep.yaml")
    assert isinstance(recipe, SweepRecipe) and 4 <= len(recipe.points) <= 16
    assert [s.name for s in recipe.stages if s.type.name == "train"] == ["dense"]
    keys = {axis.path[-1] for axis in recipe.axes}
    assert {"target", "keep"} <= keys
    counts = pd.Series([s.type.name for s in recipe.stages]).value_counts()
    assert counts["flops"] == counts["bench"] == len(recipe.points)


@pytest.mark.slow
def test_digits_sweep_end_to_end_with_two_jobs(tmp_path):
    """The real library on a 2 x 2 corner of the shipped sweep, shortened: runs, skips on the second run, reports."""
    shorter = ["sweep.ticket.target=[0.5, 0.9]", "sweep.selected.keep=[0.5, 1.0]", "dense.epochs=1",
               "ticket.rounds=1", "ticket.epochs_per_round=1", "selected.epochs=1", "flops.batches=1",
               "speed.repeats=2", "speed.warmup=1"]
    store = tmp_path / "store"
    runner = CliRunner()
    args = ["--store", str(store), "run", str(ROOT / "recipes" / "digits-sweep.yaml"), *shorter]
    env = {"OMP_NUM_THREADS": "1"}
    first = runner.invoke(app, [*args, "--jobs", "2", "--format", "json"], env=env)
    assert first.exit_code == 0, first.output
    assert {row["status"] for row in json.loads(first.stdout)["rows"]} == {"ran"}
    again = runner.invoke(app, [*args, "--jobs", "2", "--format", "json"], env=env)
    assert again.exit_code == 0 and {row["status"] for row in json.loads(again.stdout)["rows"]} == {"skipped"}
    report = runner.invoke(app, ["--store", str(store), "sweep", "report", str(ROOT / "recipes" / "digits-sweep.yaml"),
                                 *shorter, "--format", "json", "--out", str(tmp_path / "plots")])
    assert report.exit_code == 0, report.output
    doc = json.loads(report.stdout)
    assert len(doc["rows"]) == 4 and all(row["energy (mJ)"] > 0 and row["img/s"] > 0 for row in doc["rows"])
    assert sorted(Path(p).name for p in doc["plots"]) == [
        "digits-sweep-heat-map.png", "digits-sweep-pareto-energy.png", "digits-sweep-pareto-throughput.png"]
    assert os.path.getsize(doc["plots"][0]) > 1000

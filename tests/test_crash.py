"""Crash test (#19): SIGKILL `train`, `imp`, `select-tokens`, `export` and `run` at seeded random moments.

After each kill: `spkprune ls` works, every artifact that was in the store before the command keeps its bytes, and
the killed writer's temp files are gone. Then the command is run again (`--resume` for train and imp once the run
has begun, a plain re-run otherwise, with `--overwrite` where select-tokens or export had finished its output before
the kill) and must finish with the result of an uninterrupted run: the same tags holding the same tensors (weights
and masks), and the same exported files.

The uninterrupted runs form one chain, each command reading the previous one's store (copied): train -> imp ->
select-tokens -> export; a killed command runs in another copy of the same input store. Kill moments are drawn
with a fixed seed per command: the first from [the uninterrupted run's first write, its end] (the fresh run has
begun to write), the next ones, of the re-runs, from [0.2 s, its end]. So a kill may land during start-up, while
training, mid-save, or after the command finished; every case must keep the promise. Each kill's moment and what
the killed run had left are printed (`pytest -rP`) and named in assertion messages. Two more tests kill at chosen
moments that random ones hardly ever hit: right after train saves its result and right after imp saves a round,
before either removes the training state that led there (`crashkit.spkprune_killed_after_saving`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest
import torch

from crashkit import (
    Kill, blob_digests, file_digests, kill_after, ls_json, run_digests, run_to_end, safetensors_content, spkprune,
    spkprune_killed_after_saving, weights_digest,
)
from spkprune.checkpoint import Checkpoint, save_checkpoint
from spkprune.models import create_model
from spkprune.store import Store
from spkprune.store.store import TMP_DIR

pytestmark = pytest.mark.slow

ARCH = "spikformer-2-64-digits"
TRAIN = ["train", "--dataset", "digits", "--name", "dense", "--epochs", "2", "--limit-batches", "3", "--threads", "1",
         "--no-progress"]
NEW_RUN = ["--arch", ARCH]  # --resume refuses --arch: a resumed run keeps its own
# Two epochs a round: a round in progress saves its state after epoch 1, which a kill can land after.
IMP = ["imp", "dense", "--name", "ticket", "--rounds", "2", "--target", "0.5", "--epochs-per-round", "2",
       "--no-progress"]
SELECT = ["select-tokens", "ticket@round-2", "--name", "selected", "--epochs", "1", "--keep", "0.7"]
EXPORTED_FILES = {"README.md", "config.json", "model.sparse.safetensors"}
RECIPE = """
name: tiny
model: spikformer-2-64-digits
data: {dataset: digits}
seed: 3
stages:
  dense: {type: train, epochs: 2, limit_batches: 3}
  ticket: {type: imp, from: dense, rounds: 2, target: 0.5, epochs_per_round: 1}
  selected: {type: select-tokens, from: ticket, keep: 0.7, epochs: 1}
  flops: {type: flops, from: selected, batches: 1}
  export: {type: export, from: selected, format: sparse, out: export}
"""
RECIPE_NAMES = ("tiny-dense", "tiny-ticket", "tiny-selected")

# SPKPRUNE_CRASH_SEED=N draws other moments (to hunt for crash bugs; CI uses 0).
SEEDS = {command: 1901 + i + 100 * int(os.environ.get("SPKPRUNE_CRASH_SEED", "0"))
         for i, command in enumerate(("train", "imp", "select-tokens", "export", "run"))}
KILLS = {"train": 2, "imp": 2, "select-tokens": 1, "export": 1, "run": 1}


@dataclass
class Timing:
    """An uninterrupted run's wall time, and when it first wrote to the store (its start-up ends about then)."""

    seconds: float
    first_write: float


@dataclass
class Chain:
    """Stores after each uninterrupted command, the export folder, and each command's timing."""

    base: Path  # one bystander checkpoint, no run yet
    trained: Path
    pruned: Path
    selected: Path
    export: Path
    timing: dict[str, Timing] = field(default_factory=dict)


def _save_bystander(root: Path) -> None:
    """An artifact no command under test touches: it must keep its bytes through every crash."""
    torch.manual_seed(0)
    model = create_model(ARCH)
    meta = {"arch": ARCH, "config": model.config.to_dict(), "selector": None}
    save_checkpoint(Store.open(root), "bystander", "main", Checkpoint(dict(model.state_dict()), {}, meta))


def uninterrupted(store: Path, args: list[str], cwd: Path | None = None) -> Timing:
    """Run the command to its end in `store` (the reference result) and time it."""
    before = set(blob_digests(store))
    spawned = time.time()
    done = run_to_end(spkprune(store, *args), cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    created = [datetime.fromisoformat(art.created.replace("Z", "+00:00")).timestamp()
               for art in Store.open(store, create=False).list() if art.ref not in before]
    return Timing(done.seconds, min(created, default=spawned) - spawned)


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Chain:
    top = tmp_path_factory.mktemp("reference")
    chain = Chain(top / "base", top / "trained", top / "pruned", top / "selected", top / "export")
    _save_bystander(chain.base)
    steps = [("train", chain.base, chain.trained, TRAIN + NEW_RUN), ("imp", chain.trained, chain.pruned, IMP),
             ("select-tokens", chain.pruned, chain.selected, SELECT)]
    for command, source, store, args in steps:
        shutil.copytree(source, store)
        chain.timing[command] = uninterrupted(store, args)
    export = ["export", "selected", "--out", str(chain.export), "--format", "sparse"]
    chain.timing["export"] = uninterrupted(chain.selected, export)
    return chain


# ------------------------------------------------------------------------------------------------ checks
def kill_delays(command: str, timing: Timing) -> list[float]:
    """The first kill lands while the fresh run works (between its first write and its end), when a crash costs
    the most; later ones, of the re-runs, anywhere from start-up on."""
    rng = random.Random(SEEDS[command])
    working = rng.uniform(max(timing.first_write, 0.2), timing.seconds)
    anywhere = [rng.uniform(0.2, timing.seconds) for _ in range(KILLS[command] - 1)]
    return [round(delay, 2) for delay in (working, *anywhere)]


def check_store_is_intact(root: Path, before: dict[str, str], kills: list[Kill]) -> None:
    """`ls` works, the artifacts of `before` keep their bytes, and no temp file of a killed writer is left."""
    listed = {row["ref"]: row for row in ls_json(root)}
    after = blob_digests(root)
    for ref, sha256 in before.items():
        assert ref in listed, f"{kills}: {ref} is gone from `spkprune ls`"
        assert after.get(ref) == sha256, f"{kills}: {ref} changed its bytes"
    assert list((root / TMP_DIR).iterdir()) == [], f"{kills}: temp files left after the store was opened"


@dataclass
class Crash:
    """One command killed at its seeded moments in store `root`, then run to the end."""

    command: str
    root: Path
    timing: Timing
    cwd: Path | None = None
    kills: list[Kill] = field(default_factory=list)

    def __post_init__(self):
        self.before = blob_digests(self.root)  # what the command must leave alone

    def kill(self, next_args, footprint=None) -> list[Kill]:
        """Start the command (`next_args(root)`: its arguments in the store's current state) and kill it, as often
        as KILLS says, checking the store after each kill. `footprint(root)` says what a kill left outside it."""
        for delay in kill_delays(self.command, self.timing):
            kill = kill_after(spkprune(self.root, *next_args(self.root)), delay, self.cwd)
            self.kills.append(kill)
            mid_save = any((self.root / TMP_DIR).glob("*"))  # looked at before `ls` opens the store and removes it
            check_store_is_intact(self.root, self.before, self.kills)
            left = sorted(set(blob_digests(self.root)) - set(self.before))
            left += (["a temp blob (mid-save)"] if mid_save else []) + (footprint(self.root) if footprint else [])
            kill.left = ", ".join(left)
        return self.kills

    def finish(self, args: list[str]):
        """The run after the kills: it must succeed and leave the earlier artifacts alone."""
        done = run_to_end(spkprune(self.root, *args), self.cwd)
        assert done.returncode == 0, f"{self.kills}: the re-run failed: {done.stderr[-3000:]}"
        check_store_is_intact(self.root, self.before, self.kills)
        print(f"{self.command}: uninterrupted {self.timing.seconds:.1f} s (first write at "
              f"{self.timing.first_write:.1f} s); {'; '.join(map(repr, self.kills))}; re-run {done.seconds:.1f} s")
        return done


def assert_same_run(root: Path, reference: Path, name: str, context) -> None:
    """NAME has the same tags in both stores, each holding the same tensors (a training state left over counts)."""
    got, expected = run_digests(root, name), run_digests(reference, name)
    differing = sorted(tag for tag in set(got) & set(expected) if got[tag] != expected[tag])
    assert got == expected, (
        f"{context}: {name} differs from the uninterrupted run: extra tags {sorted(set(got) - set(expected))}, "
        f"missing tags {sorted(set(expected) - set(got))}, other tensors in {differing}"
    )


def started(root: Path, name: str) -> bool:
    return bool(Store.open(root, create=False).tags(name))


def fresh_copy(source: Path, tmp_path: Path) -> Path:
    root = tmp_path / "store"
    shutil.copytree(source, root)
    return root


# ------------------------------------------------------------------------------------------------- tests
def test_killed_train_resumes_to_the_uninterrupted_weights(chain, tmp_path):
    crash = Crash("train", fresh_copy(chain.base, tmp_path), chain.timing["train"])

    def args(root: Path) -> list[str]:
        return TRAIN + (["--resume"] if started(root, "dense") else NEW_RUN)  # nothing to resume before dense@init

    kills = crash.kill(args)
    crash.finish(args(crash.root))
    assert_same_run(crash.root, chain.trained, "dense", kills)


def test_killed_imp_resumes_to_the_uninterrupted_rounds(chain, tmp_path):
    crash = Crash("imp", fresh_copy(chain.trained, tmp_path), chain.timing["imp"])

    def args(root: Path) -> list[str]:
        return IMP + (["--resume"] if started(root, "ticket") else [])  # nothing to resume before ticket@round-0

    kills = crash.kill(args)
    crash.finish(args(crash.root))
    assert_same_run(crash.root, chain.pruned, "ticket", kills)
    assert (crash.root / "plots" / "ticket-imp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", kills


def test_killed_select_tokens_reruns_to_the_uninterrupted_weights(chain, tmp_path):
    crash = Crash("select-tokens", fresh_copy(chain.pruned, tmp_path), chain.timing["select-tokens"])
    expected = weights_digest(chain.selected, "selected")

    def args(root: Path) -> list[str]:
        if not started(root, "selected"):
            return SELECT
        # The kill came after the save: what was saved is the finished result, and replacing it needs --overwrite.
        assert weights_digest(root, "selected") == expected, crash.kills
        return SELECT + ["--overwrite"]

    kills = crash.kill(args)
    crash.finish(args(crash.root))
    assert weights_digest(crash.root, "selected") == expected, kills
    assert [a.tag for a in Store.open(crash.root).list("selected")] == ["main"], kills


def test_killed_export_reruns_to_the_same_files(chain, tmp_path):
    crash = Crash("export", fresh_copy(chain.selected, tmp_path), chain.timing["export"])
    out = tmp_path / "exports" / "selected"
    expected = file_digests(chain.export)
    assert set(expected) == EXPORTED_FILES

    def args(root: Path) -> list[str]:
        command = ["export", "selected", "--out", str(out), "--format", "sparse"]
        if not out.exists():
            return command
        # The folder appears complete or not at all (renamed into place); a complete one needs --overwrite.
        assert file_digests(out) == expected, crash.kills
        return command + ["--overwrite"]

    def beside_out(root: Path) -> list[str]:
        return sorted(p.name for p in out.parent.iterdir()) if out.parent.is_dir() else []

    kills = crash.kill(args, footprint=beside_out)
    crash.finish(args(crash.root))
    # The same checkpoint gives the same bytes, model card included: it names no time, only the lineage.
    assert file_digests(out) == expected, kills
    assert beside_out(crash.root) == ["selected"], f"{kills}: temporary folders left beside --out"


def kill_right_after_saving(ref: str, root: Path, args: list[str]) -> None:
    killed = run_to_end(spkprune_killed_after_saving(ref, root, *args))
    assert killed.returncode == -signal.SIGKILL, f"not killed after saving {ref}: {killed.stderr[-3000:]}"


def resume(root: Path, args: list[str]) -> None:
    resumed = run_to_end(spkprune(root, *args, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]


# Chosen moments that random ones hardly ever hit: just after a command saved a result, before it removed the
# training state that led to it.
def test_train_killed_right_after_saving_its_result_resumes_to_the_uninterrupted_run(chain, tmp_path):
    root = fresh_copy(chain.base, tmp_path)
    kill_right_after_saving("dense@main", root, TRAIN + NEW_RUN)  # dense@train-state is still there
    resume(root, TRAIN)
    assert_same_run(root, chain.trained, "dense", "killed right after saving dense@main")


def test_imp_killed_right_after_saving_a_round_resumes_to_the_uninterrupted_run(chain, tmp_path):
    root = fresh_copy(chain.trained, tmp_path)
    kill_right_after_saving("ticket@round-1", root, IMP)  # ticket@round-1-epoch-1 is still there
    resume(root, IMP)
    assert_same_run(root, chain.pruned, "ticket", "killed right after saving ticket@round-1")


def stages_done(root: Path) -> list[str]:
    """The stages the recipe's run record calls done."""
    record = root / "recipe-runs" / "tiny.json"
    stages = json.loads(record.read_text())["stages"] if record.is_file() else {}
    return [name for name, entry in stages.items() if entry["status"] == "done"]


def test_killed_recipe_run_reruns_to_the_uninterrupted_pipeline(chain, tmp_path):
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    for folder in (reference, crashed):
        shutil.copytree(chain.base, folder / "store")
        (folder / "tiny.yaml").write_text(RECIPE)  # relative paths: both runs resolve the same recipe
    command = ["run", "tiny.yaml", "--format", "json"]
    crash = Crash("run", crashed / "store", uninterrupted(reference / "store", command, cwd=reference), cwd=crashed)

    def recorded(root: Path) -> list[str]:
        return [f"stages done: {', '.join(stages_done(root)) or 'none'}"]

    kills = crash.kill(lambda root: command, footprint=recorded)
    done_before = stages_done(crash.root)
    status = {row["stage"]: row["status"] for row in json.loads(crash.finish(command).stdout)["rows"]}
    assert all(status[stage] == "skipped" for stage in done_before), (kills, status)
    for name in RECIPE_NAMES:
        assert_same_run(crash.root, reference / "store", name, kills)
    assert_same_export(reference / "export", crashed / "export", kills)


def assert_same_export(expected: Path, got: Path, kills: list[Kill]) -> None:
    """Byte-equal config.json and model card; the same tensors and header in the weights file, whose header holds
    the checkpoint's metadata with its creation time (a recipe run makes the checkpoint anew, at another time)."""
    assert sorted(p.name for p in got.iterdir()) == sorted(EXPORTED_FILES), kills
    for name in ("config.json", "README.md"):
        assert (got / name).read_bytes() == (expected / name).read_bytes(), (kills, name)
    weights = "model.sparse.safetensors"
    assert safetensors_content(got / weights) == safetensors_content(expected / weights), kills

"""`spkprune run --jobs N`: a recipe's independent stages run at once, in up to N worker processes.

The parent decides every stage (skip, resume, run) as `run_recipe` does, holds the recipe's run lock, and hands a
stage to an idle worker when the stages it reads have finished. Each worker (`python -m spkprune.recipes.worker`)
loads the same recipe once, then runs the stages it is sent, one at a time, through the runner's own code path on
its share of the cores (cores // N threads, fixed: more threads than free cores slow PyTorch down badly). Workers
share the store (it takes concurrent writers) and the run record, whose entries they change under a lock on its
freshest copy. A failing stage, or Ctrl-C, stops the other workers (interrupted, so their stages resume on the next
run); finished stages stay recorded.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from spkprune.errors import SpkpruneError
from spkprune.recipes.loading import load_recipe
from spkprune.recipes.preflight import preflight
from spkprune.recipes.record import RunRecord, run_lock
from spkprune.recipes.recipe import Recipe, Stage
from spkprune.recipes.runner import Log, RunReport, StageOutcome, plan, run_one_stage
from spkprune.store import Store

WORKER = (sys.executable, "-m", "spkprune.recipes.worker")
RUNS_ALONE = ("bench",)  # stage types that measure time: nothing else runs beside them
POLL_S = 0.1
STOP_WAIT_S = 30.0


# ---------------------------------------------------------------------------------------------- the record
class SharedRunRecord(RunRecord):
    """A run record that several processes write: each change is made, under a lock, to the copy on disk, so no
    worker's entry overwrites another's."""

    def start(self, name: str, entry: dict) -> None:
        self._change(lambda record: RunRecord.start(record, name, entry))

    def finish(self, name: str, outputs: dict, result: dict, seconds: float) -> None:
        self._change(lambda record: RunRecord.finish(record, name, outputs, result, seconds))

    def set_recipe(self, resolved: dict) -> None:
        def change(record: RunRecord) -> None:
            record.recipe = resolved
            record.save()

        self._change(change)

    def _change(self, change: Callable[[RunRecord], None]) -> None:
        with _locked(self.path.with_name(f"{self.path.name}.lock")):
            fresh = RunRecord.load(self.path.parent.parent, self.path.stem)
            change(fresh)
            self.recipe, self.stages = fresh.recipe, fresh.stages


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


# ---------------------------------------------------------------------------------------------- the parent
def run_in_workers(
    recipe: Recipe, store_root: str | os.PathLike, jobs: int, *, log: Log = lambda message: None,
    command: tuple[str, ...] = WORKER,
) -> RunReport:
    """Run `recipe` like `run_recipe`, with up to `jobs` stages at once in worker processes (`command`)."""
    if jobs < 1:
        raise SpkpruneError(f"--jobs: must be >= 1 (got {jobs})")
    if recipe.path is None:
        raise SpkpruneError("--jobs: workers read the recipe from its file; run a recipe file")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SpkpruneError("--jobs: runs several processes on one machine; under torchrun use --jobs 1")
    store_root = Path(store_root).absolute()
    pending = [s for s, o in zip(recipe.stages, plan(recipe, store_root)) if o.action != "skip"]
    preflight(recipe, pending, Store.existing(store_root))  # before the store or its lock file is touched
    Store.open(store_root, create=True)
    with run_lock(store_root, recipe.name):
        decisions = plan(recipe, store_root)  # again: nothing else can change the record now
        record = SharedRunRecord.load(store_root, recipe.name)
        todo = [(s, o) for s, o in zip(recipe.stages, decisions) if o.action != "skip"]
        outcomes = {o.stage: _skipped(o, record, log) for o in decisions if o.action == "skip"}
        if todo:
            record.set_recipe(recipe.resolved)
            with _Pool(recipe, store_root, jobs, log, command) as pool:
                outcomes.update(pool.run(todo))
        return RunReport(recipe, store_root, [outcomes[stage.name] for stage in recipe.stages])


def threads_per_job(jobs: int) -> int:
    """Each worker's share of the cores this process may use (at least one)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // jobs)


def _skipped(outcome: StageOutcome, record: RunRecord, log: Log) -> StageOutcome:
    entry = record.stage(outcome.stage) or {}
    log(f"{outcome.stage} ({outcome.type}): skipped, {outcome.reason} ({outcome.hash})")
    return dataclasses.replace(outcome, result=entry.get("result") or {}, seconds=float(entry.get("seconds") or 0.0))


@dataclass
class _Worker:
    number: int
    process: subprocess.Popen
    stage: Stage | None = None  # the stage it runs now; None: idle


class _Pool:
    """Up to `jobs` worker processes, started as stages become ready; each runs one stage at a time, sent as a
    JSON line on its stdin, and answers with a JSON line on its stdout. Their stderr is logged as it comes."""

    def __init__(self, recipe: Recipe, store_root: Path, jobs: int, log: Log, command: tuple[str, ...]):
        self.recipe, self.store_root, self.jobs, self.log, self.command = recipe, store_root, jobs, log, command
        self.threads = threads_per_job(jobs)
        self.workers: list[_Worker] = []
        self.events: queue.Queue = queue.Queue()
        self.started = 0

    def __enter__(self) -> "_Pool":
        return self

    def __exit__(self, kind, error, trace) -> None:
        self.stop(interrupt=kind is not None)

    def run(self, todo: list[tuple[Stage, StageOutcome]]) -> dict[str, StageOutcome]:
        names = {stage.name for stage, _ in todo}
        waiting, done = list(todo), {}
        while waiting or self.busy():
            for item in [item for item in waiting if all(dep in done or dep not in names for dep in item[0].deps)]:
                if not self.may_start(item[0]):
                    continue
                if not self.assign(*item, total=len(todo)):
                    break
                waiting.remove(item)
            if not self.busy():  # cannot happen: a stage reads earlier stages
                raise SpkpruneError(f"no stage can start: {', '.join(stage.name for stage, _ in waiting)}")
            worker, message = self.next_event()
            outcome = self.finished(worker, message)
            done[outcome.stage] = outcome
        return done

    def busy(self) -> list[Stage]:
        return [worker.stage for worker in self.workers if worker.stage is not None]

    def may_start(self, stage: Stage) -> bool:
        """A stage that measures speed runs alone, so that no other stage disturbs its timings."""
        running = self.busy()
        alone = stage.type.name in RUNS_ALONE or any(other.type.name in RUNS_ALONE for other in running)
        return not (alone and running)

    def assign(self, stage: Stage, decision: StageOutcome, *, total: int) -> bool:
        """Send `stage` to an idle worker (started if there is room); False when all `jobs` workers are busy."""
        worker = next((w for w in self.workers if w.stage is None), None)
        if worker is None and len(self.workers) < self.jobs:
            worker = self.spawn()
        if worker is None:
            return False
        self.started += 1
        worker.stage = stage
        task = {"stage": stage.name, "action": decision.action, "reason": decision.reason, "hash": stage.hash}
        worker.process.stdin.write(json.dumps(task) + "\n")
        worker.process.stdin.flush()
        self.log(f"[{self.started}/{total}] {stage.name} ({stage.type.name}): {decision.reason} "
                 f"(worker {worker.number})")
        return True

    def spawn(self) -> _Worker:
        argv = [*self.command, "--store", str(self.store_root), "--threads", str(self.threads), "--",
                str(self.recipe.path), *self.recipe.overrides]
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        process = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, bufsize=1,
                                   start_new_session=True)  # Ctrl-C reaches the parent, which stops them
        worker = _Worker(len(self.workers) + 1, process)
        self.workers.append(worker)
        self.log(f"worker {worker.number}: process {process.pid}, {self.threads} thread(s)")
        threading.Thread(target=self.read_answers, args=(worker,), daemon=True).start()
        threading.Thread(target=self.read_log, args=(worker,), daemon=True).start()
        return worker

    def read_answers(self, worker: _Worker) -> None:
        for line in worker.process.stdout:
            self.events.put((worker, json.loads(line)))
        self.events.put((worker, {"exit": worker.process.wait()}))

    def read_log(self, worker: _Worker) -> None:
        for line in worker.process.stderr:
            self.log(f"  {line.rstrip()}")

    def next_event(self) -> tuple[_Worker, dict]:
        while True:
            try:
                return self.events.get(timeout=POLL_S)
            except queue.Empty:
                continue

    def finished(self, worker: _Worker, message: dict) -> StageOutcome:
        stage, worker.stage = worker.stage, None
        if "outcome" in message:
            outcome = StageOutcome(**message["outcome"])
            self.log(f"{outcome.stage} ({outcome.type}): finished in {outcome.seconds:.1f} s")
            return outcome
        if "error" in message:
            raise SpkpruneError(message["error"])
        what = f"stage {stage.name!r} ({stage.type.name})" if stage else f"worker {worker.number}"
        raise SpkpruneError(f"{what} failed: its worker process exited with code {message.get('exit')} "
                            "(its output is above)")

    def stop(self, *, interrupt: bool) -> None:
        """End every worker: idle ones when their stdin closes; busy ones, on an error or Ctrl-C, by an interrupt
        (their stages resume on the next run)."""
        for worker in self.workers:
            if interrupt and worker.stage is not None and worker.process.poll() is None:
                worker.process.send_signal(signal.SIGINT)
            try:
                worker.process.stdin.close()
            except OSError:
                pass
        for worker in self.workers:
            try:
                worker.process.wait(timeout=STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()


# ---------------------------------------------------------------------------------------------- the worker
def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m spkprune.recipes.worker",
                                     description="Run stages of a recipe sent on stdin (by `spkprune run --jobs N`).")
    parser.add_argument("--store", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run each stage named on stdin; answer {"outcome": ...} or {"error": ...} per stage on stdout."""
    args = _arguments(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the parent's interrupt, even if started ignoring it
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # anything else printed goes to the log, not the answers
    torch.set_num_threads(max(1, args.threads))
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        store = Store.open(Path(args.store), create=False)
        record = SharedRunRecord.load(Path(args.store), recipe.name)
        for line in sys.stdin:
            answers.write(json.dumps(_answer(recipe, store, record, json.loads(line))) + "\n")
    except SpkpruneError as err:  # the recipe no longer loads: every stage sent fails with this
        for line in sys.stdin:
            answers.write(json.dumps({"error": str(err)}) + "\n")
    except KeyboardInterrupt:
        return 130
    return 0


def _answer(recipe: Recipe, store: Store, record: SharedRunRecord, task: dict) -> dict:
    stage = next((s for s in recipe.stages if s.name == task["stage"]), None)
    if stage is None or stage.hash != task["hash"]:
        return {"error": f"recipe {recipe.path} changed while it ran (stage {task['stage']!r}); run it again"}

    def log(message: str) -> None:
        print(f"{stage.name}: {message}", file=sys.stderr)

    try:
        outcome = run_one_stage(recipe, stage, task["action"], task["reason"], store, record, log)
    except SpkpruneError as err:
        return {"error": str(err)}
    return {"outcome": dataclasses.asdict(outcome)}


if __name__ == "__main__":  # pragma: no cover - started by run_in_workers
    sys.exit(main())

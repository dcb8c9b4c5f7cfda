"""Run a resolved recipe: decide per stage (skip, resume, run), run it, stamp its artifacts, record the outcome.

Rules (the open_lth way, with user-chosen names):
- a stage whose record has the same identity hash, status `done` and intact outputs is skipped;
- a stage recorded `running` with the same hash was interrupted: imp and train continue with `--resume`;
- a stage whose hash changed, whose outputs are gone, or one of whose inputs ran in this invocation runs again,
  after removing the outputs its earlier version wrote (only outputs this recipe stage is known to own).
Every checkpoint a stage writes gets `meta["recipe"]` (the resolved recipe) and `meta["recipe_stage"]`.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from spkprune.errors import SpkpruneError
from spkprune.recipes.preflight import preflight
from spkprune.recipes.record import RunRecord, run_lock
from spkprune.recipes.recipe import Recipe, Stage
from spkprune.store import Artifact, Store, parse_ref
from spkprune.training import distributed

Log = Callable[[str], None]
STAMPED_TAGS = ("main", "init")  # plus every round-K of an imp stage


@dataclass
class StageOutcome:
    stage: str
    type: str
    action: str  # run | resume | skip
    reason: str
    hash: str
    output: str | None
    result: dict = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class RunReport:
    recipe: Recipe
    store: Path
    outcomes: list[StageOutcome]

    @property
    def plots(self) -> list[str]:
        seen: list[str] = []
        for outcome in self.outcomes:
            for plot in outcome.result.get("plots", []):
                if plot not in seen:
                    seen.append(plot)
        return seen


# --------------------------------------------------------------------------------------------- decisions
def decide(stage: Stage, entry: dict | None, store: Store, ran: set[str]) -> tuple[str, str]:
    """(action, reason) for one stage given its record entry and the stages that ran in this invocation."""
    changed = [dep for dep in stage.deps if dep in ran]
    if changed:
        return "run", f"input {changed[0]} ran again"
    if entry is None:
        return "run", "not run yet"
    if entry.get("hash") != stage.hash:
        return "run", f"options changed (hash {entry.get('hash')} -> {stage.hash})"
    if entry.get("status") == "done":
        missing = missing_output(entry, store)
        return ("run", f"output {missing} is gone") if missing else ("skip", "finished")
    if stage.type.resumable and stage.artifact and store.list(stage.artifact):
        return "resume", "interrupted; resuming"
    return "run", "interrupted; starting over"


def missing_output(entry: dict, store: Store) -> str | None:
    """The first recorded output that is gone. A checkpoint counts as there while it carries this stage's hash:
    later stages may add metadata to it (flops reports), which changes its bytes but not what it is."""
    outputs = entry.get("outputs") or {}
    for ref in outputs.get("refs") or {}:
        art = store.get(*parse_ref(ref))
        if art is None or (art.meta.get("recipe_stage") or {}).get("hash") != entry.get("hash"):
            return ref
    folder = outputs.get("folder")
    if folder:
        for name in outputs.get("files", []):
            if not (Path(folder) / name).is_file():
                return str(Path(folder) / name)
    return None


def plan(recipe: Recipe, store_root: Path) -> list[StageOutcome]:
    """What a run would do now, assuming every stage that runs changes its outputs."""
    record = RunRecord.load(store_root, recipe.name)
    store = Store.open(store_root, create=False) if (Path(store_root) / "index.sqlite").is_file() else None
    ran: set[str] = set()
    outcomes = []
    for stage in recipe.stages:
        entry = record.stage(stage.name)
        if store is None:
            action, reason = "run", "not run yet (no store)"
        else:
            action, reason = decide(stage, entry, store, ran)
        if action != "skip":
            ran.add(stage.name)
        outcomes.append(StageOutcome(stage.name, stage.type.name, action, reason, stage.hash, stage.output_ref))
    return outcomes


# --------------------------------------------------------------------------------------------------- run
def run_recipe(recipe: Recipe, store_root: str | os.PathLike, *, log: Log = lambda message: None) -> RunReport:
    """Run every stage of `recipe` against the store at `store_root`, skipping what is finished."""
    store_root = Path(store_root)
    pending = [s for s, o in zip(recipe.stages, plan(recipe, store_root)) if o.action != "skip"]
    preflight(recipe, pending, Store.existing(store_root))  # before the store or its lock file is touched
    store = Store.open(store_root, create=True)
    main = distributed.is_main_process()
    lock = run_lock(store_root, recipe.name) if main else nullcontext()
    with lock:
        record = RunRecord.load(store_root, recipe.name)
        record.recipe = recipe.resolved
        ran: set[str] = set()
        outcomes: list[StageOutcome] = []
        for index, stage in enumerate(recipe.stages, 1):
            entry = record.stage(stage.name)
            action, reason = decide(stage, entry, store, ran)
            head = f"[{index}/{len(recipe.stages)}] {stage.name} ({stage.type.name})"
            if action == "skip":
                log(f"{head}: skipped, {reason} ({stage.hash})")
                outcomes.append(
                    StageOutcome(stage.name, stage.type.name, action, reason, stage.hash, stage.output_ref,
                                 entry.get("result") or {}, float(entry.get("seconds") or 0.0))
                )
                continue
            log(f"{head}: {reason}")
            outcome = _run_stage(recipe, stage, action, reason, entry, store, record if main else None, log)
            outcomes.append(outcome)
            ran.add(stage.name)
        return RunReport(recipe, store_root, outcomes)


def run_one_stage(recipe: Recipe, stage: Stage, action: str, reason: str, store: Store, record: RunRecord,
                  log: Log) -> StageOutcome:
    """Run one stage whose action (run or resume) the caller decided: a worker of `spkprune run --jobs N`."""
    return _run_stage(recipe, stage, action, reason, record.stage(stage.name), store, record, log)


def _run_stage(
    recipe: Recipe, stage: Stage, action: str, reason: str, entry: dict | None, store: Store,
    record: RunRecord | None, log: Log,
) -> StageOutcome:
    overwrite = False
    if action == "run":
        overwrite = _clear_stale_outputs(recipe, stage, entry, store)
    resume = action == "resume"
    options = {k: v for k, v in stage.options.items() if not (resume and k in stage.type.resume_drops)}
    settings = stage.type.build(options, resume=resume, overwrite=overwrite)
    if record is not None:
        record.start(stage.name, {"type": stage.type.name, "hash": stage.hash, "artifact": stage.artifact,
                                  "out": stage.options.get("out")})
    started = time.perf_counter()
    try:
        result = stage.type.run(store, settings, progress=sys.stderr.isatty(), log=log)
    except SpkpruneError as err:
        raise SpkpruneError(f"stage {stage.name!r} ({stage.type.name}) failed: {err}") from None
    seconds = time.perf_counter() - started
    distributed.barrier()
    outputs: dict[str, Any] = {}
    if record is not None:
        _stamp_artifacts(recipe, stage, store)
        outputs = _outputs(stage, store)
        record.finish(stage.name, outputs, result, seconds)
    distributed.barrier()
    return StageOutcome(stage.name, stage.type.name, action, reason, stage.hash, stage.output_ref, result, seconds)


def _clear_stale_outputs(recipe: Recipe, stage: Stage, entry: dict | None, store: Store) -> bool:
    """Remove what an earlier version of this stage wrote; refuse to touch anything else. True: overwrite `out`."""
    key = f"stages.{stage.name}"
    if stage.artifact:
        existing = store.list(stage.artifact)
        if not existing:
            return False
        owned = (entry or {}).get("artifact") == stage.artifact or all(
            _made_by(art, recipe.name, stage.name) for art in existing
        )
        if not owned:
            raise SpkpruneError(
                f"{key}: the store already holds {stage.artifact} (not made by stage {stage.name!r} of recipe "
                f"{recipe.name!r}); set {key}.name to a new name or remove it (spkprune rm {stage.artifact})"
            )
        if distributed.is_main_process():
            for art in existing:
                store.delete(art.name, art.tag)
        return False
    out = stage.options.get("out")
    if out and Path(out).is_dir() and any(Path(out).iterdir()):
        if (entry or {}).get("out") != out:
            raise SpkpruneError(
                f"{key}.out: folder {out} exists and was not written by this recipe; choose another out or remove it"
            )
        return True
    return False


def _made_by(art: Artifact, recipe: str, stage: str) -> bool:
    mark = art.meta.get("recipe_stage") or {}
    return mark.get("recipe") == recipe and mark.get("stage") == stage


def _stamp_artifacts(recipe: Recipe, stage: Stage, store: Store) -> None:
    """Write the resolved recipe into every checkpoint the stage produced (meta["recipe"], meta["recipe_stage"])."""
    if not stage.artifact:
        return
    mark = {"recipe": recipe.name, "stage": stage.name, "hash": stage.hash,
            "file": str(recipe.path) if recipe.path else None}
    for art in store.list(stage.artifact):
        if art.kind != "checkpoint" or not _stamped_tag(art.tag):
            continue
        if art.meta.get("recipe_stage") == mark and art.meta.get("recipe") == recipe.resolved:
            continue
        store.update_meta(art.ref, "recipe", recipe.resolved)
        store.update_meta(art.ref, "recipe_stage", mark)


def _stamped_tag(tag: str) -> bool:
    return tag in STAMPED_TAGS or (tag.startswith("round-") and tag[len("round-"):].isdigit())


def _outputs(stage: Stage, store: Store) -> dict:
    if stage.artifact:
        refs = {art.ref: art.sha256 for art in store.list(stage.artifact) if _stamped_tag(art.tag)}
        if stage.output_ref not in refs:
            raise SpkpruneError(
                f"stage {stage.name!r} finished but {stage.output_ref} is not in the store; "
                "its command did not write what the recipe expects"
            )
        return {"refs": refs}
    out = stage.options.get("out")
    if out:
        folder = Path(out)
        return {"folder": str(folder), "files": sorted(p.name for p in folder.iterdir() if p.is_file())}
    return {}

"""`spkprune bench` as a library call: settings in, a `BenchReport` out (and each stored checkpoint's
`meta["bench"]` set, unless told not to)."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone

import torch

from spkprune.bench import memory
from spkprune.bench.machine import machine_info, pick_device
from spkprune.bench.measure import Subject, load_subject, measure
from spkprune.bench.report import SPEEDUP_NOTE, BenchReport, ref_results
from spkprune.bench.settings import BenchSettings
from spkprune.counting.sources import is_stored
from spkprune.errors import SpkpruneError
from spkprune.store import Store

NOTE_PRESET = "preset: freshly initialised weights (firing rates, and so the speed, are not a trained model's)"


def run_bench(store: Store | None, settings: BenchSettings, *, progress: bool = True) -> BenchReport:
    """Measure every reference of `settings` on the fast inference path, the first one the baseline."""
    device = pick_device(settings.device)
    targets = _save_targets(store, settings)
    threads = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    try:
        subjects = [_load(ref, store, settings, device) for ref in settings.refs]
        timings = measure(subjects, repeats=settings.repeats, warmup=settings.warmup, progress=progress)
        report = BenchReport(
            results=ref_results(subjects, timings, settings.batch_size), machine=machine_info(device),
            settings=_recorded_settings(settings), memory_method=memory.method(device), measured_at=_now(),
            notes=_notes(subjects),
        )
    finally:
        torch.set_num_threads(threads)
    return _save(store, report, targets)


def _load(ref: str, store: Store | None, settings: BenchSettings, device: torch.device) -> Subject:
    return load_subject(ref, store, batch_size=settings.batch_size, seed=settings.seed, device=device,
                        compile=settings.compile)


def _save_targets(store: Store | None, settings: BenchSettings) -> list[str | None]:
    """Per reference, the NAME@TAG whose metadata gets the result (None: not saved), checked before any work."""
    stored = [store.resolve(ref).ref if is_stored(ref, store) else None for ref in settings.refs]
    if settings.save:
        missing = [ref for ref, target in zip(settings.refs, stored) if target is None]
        if missing:
            raise SpkpruneError(f"--save keeps the result with checkpoints in the store, and {missing[0]!r} is not "
                                "one (use --no-save, or measure it without --save)")
    return stored if settings.save is not False else [None] * len(stored)


def _save(store: Store | None, report: BenchReport, targets: list[str | None]) -> BenchReport:
    results = list(report.results)
    for index, target in enumerate(targets):
        if target is not None:
            store.update_meta(target, "bench", report.stored_entry(index))
            results[index] = dataclasses.replace(results[index], saved_to=target)
    return dataclasses.replace(report, results=results)


def _recorded_settings(settings: BenchSettings) -> dict:
    keys = ("batch_size", "repeats", "warmup", "threads", "compile", "device", "seed")
    return {key: getattr(settings, key) for key in keys}


def _notes(subjects: list[Subject]) -> list[str]:
    notes = [SPEEDUP_NOTE, "latency: per image at batch 1 (median and p90 over repeats); throughput: median"]
    if any(subject.kind == "preset" for subject in subjects):
        notes.append(NOTE_PRESET)
    return notes


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")

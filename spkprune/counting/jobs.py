"""`spkprune flops report` as a library call: settings in, the report document out."""

from __future__ import annotations

from typing import Callable

from spkprune.counting.report import attach_report, check_whatif, count_operations
from spkprune.counting.settings import FlopsSettings
from spkprune.counting.sources import dataset_batches, is_stored, load_model
from spkprune.errors import SpkpruneError
from spkprune.store import Store

Log = Callable[[str], None]


def flops_report(settings: FlopsSettings, store: Store | None, *, log: Log = lambda message: None) -> dict:
    """Count the operations of a preset or checkpoint; keep the report with a stored checkpoint unless told not to.

    Returns count_operations()'s document with `source` ({"ref", "kind": "preset" | "checkpoint"})."""
    check_whatif(settings.keep, bool(settings.dataset))
    model, masks, source = load_model(settings.ref, store)
    stored = is_stored(settings.ref, store)
    if settings.save and not stored:
        raise SpkpruneError(f"--save keeps the report with a checkpoint in the store, and {settings.ref!r} is not one")
    data = None
    if settings.dataset:
        data = dataset_batches(model, settings.dataset, settings.data_dir, settings.batches, settings.batch_size)
        log(f"measuring {model.name} on {settings.batches} batch(es) of {settings.batch_size} from {settings.dataset} ...")
    result = count_operations(
        model, masks=masks, keep=settings.keep, batches=data, e_mac=settings.e_mac, e_ac=settings.e_ac,
        dataset=settings.dataset, num_batches=settings.batches if settings.dataset else None,
    )
    result["source"] = {"ref": settings.ref, "kind": source}
    if source == "preset" and settings.dataset:
        result["notes"].append("preset with freshly initialised weights: firing rates are not a trained model's")
    if stored and settings.save is not False:
        attach_report(store, store.resolve(settings.ref).ref, result)
    return result

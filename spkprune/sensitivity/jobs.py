"""`spkprune sensitivity` as a library call: settings in, the scan stored beside the checkpoint and its report out.

The scan is stored as its own artifact, `NAME@sensitivity-OVER` (`NAME@TAG.sensitivity-OVER` for another tag than
main; kind `sensitivity`, no tensors, the scan in `meta["sensitivity"]` and in the file header), written once at the
end like any artifact (temporary file, fsync, rename, index): the checkpoint itself is never rewritten, so its
checksum (which an IMP run records as its source) stays the same. A new scan over the same units replaces the old one.
"""

from __future__ import annotations

import json
from typing import Callable

from torch.utils.data import Subset

from spkprune.checkpoint import build_model, load_artifact
from spkprune.data import get_dataset
from spkprune.errors import SpkpruneError
from spkprune.models.families import family_of_meta, require
from spkprune.paths import check_output_file
from spkprune.pruning import masks as M
from spkprune.sensitivity.allocation import scan_tag
from spkprune.sensitivity.report import SensitivityReport, plot_sensitivity
from spkprune.sensitivity.scan import LayerProbes, LocationProbes, Measure, StructureProbes, run_scan
from spkprune.sensitivity.settings import SensitivitySettings
from spkprune.store import Store, format_ref, is_store_ref
from spkprune.training import TrainConfig

Log = Callable[[str], None]


def run_sensitivity(store: Store | None, settings: SensitivitySettings, *,
                    log: Log = lambda message: None) -> SensitivityReport:
    """Scan `settings.ref` (checked before any work; the store is unchanged on any error) and store the result."""
    if settings.plot is not None:
        check_output_file(settings.plot, "--plot")
    if not is_store_ref(settings.ref):
        raise SpkpruneError(f"sensitivity needs a store reference NAME[@TAG] (the scan is stored beside it), got "
                            f"{settings.ref!r}; bring the checkpoint in with `spkprune import` first")
    if store is None:
        raise SpkpruneError(f"{settings.ref!r} does not exist: there is no store yet (spkprune train, or pass --store)")
    art = store.resolve(settings.ref)
    ckpt = load_artifact(store, art)
    model = build_model(ckpt)
    probes = _probes(settings.over, model, ckpt)
    measure = _measure(settings, ckpt.meta, model)
    log(f"scanning {art.ref} over {settings.over}: {len(probes.units())} units x {len(settings.ratios)} ratios on "
        f"{len(measure.test)} test images" + (f", BatchNorm recalibrated on {settings.recalibrate} batches"
                                              if settings.recalibrate else ""))
    base, rows = run_scan(model, probes, settings.ratios, measure, log)
    scan = {
        "source": art.ref, "source_sha256": art.sha256, "over": settings.over, "ratios": list(settings.ratios),
        "recalibrate": settings.recalibrate, "images": len(measure.test), "dataset": measure.dataset,
        "base_top1": base, "chance": 1.0 / model.config.num_classes, "rows": rows,
    }
    tag = scan_tag(art.tag, settings.over)
    header = {"format": "spkprune.sensitivity", "format_version": "1", "sensitivity": json.dumps(scan, sort_keys=True)}
    store.put(art.name, tag, {}, header, {"sensitivity": scan}, kind="sensitivity", parent=art.ref, replace=True)
    report = SensitivityReport(scan, format_ref(art.name, tag))
    target = settings.plot or store.root / "plots" / f"{art.name}-{tag}.png"
    report.plot = plot_sensitivity(report, target)
    return report


def _probes(over: str, model, ckpt):
    """What one probe prunes; one line when the model has nothing of that kind."""
    family = family_of_meta(ckpt.meta)
    state_dict = {key: value.detach().clone() for key, value in model.state_dict().items()}
    masks = {**M.full_masks(state_dict, model.prunable_weights()), **ckpt.masks}
    if over == "layers":
        return LayerProbes(state_dict, masks)
    if over == "structures":
        require(family, "channel_structures", "sensitivity --over structures")
        return StructureProbes(model, state_dict, masks)
    require(family, "token_selection", "sensitivity --over locations")
    arch = ckpt.meta.get("arch") or "the model"
    if not model.selector_locations():
        raise SpkpruneError(f"sensitivity --over locations: {arch} has no selector locations (a token selector "
                            f"needs at least 2 blocks; it has {model.config.depth})")
    if ckpt.meta.get("selector"):
        raise SpkpruneError(f"sensitivity --over locations: {ckpt.ref} carries token selectors already; scan the "
                            "checkpoint they were added to")
    return LocationProbes(model, state_dict)


def _measure(settings: SensitivitySettings, meta: dict, model) -> Measure:
    train = TrainConfig.from_dict(meta["train"]) if meta.get("train") else TrainConfig()
    dataset = settings.dataset or (meta.get("train") or {}).get("dataset") or getattr(model.config, "dataset", None)
    if not dataset:
        raise SpkpruneError(f"{meta.get('arch') or 'the checkpoint'} records no data set; pass --dataset")
    data_dir = settings.data_dir or (meta.get("train") or {}).get("data_dir")
    timesteps = model.config.timesteps
    test = get_dataset(dataset, "test", data_dir, timesteps=timesteps, augment=False)
    if settings.samples is not None and settings.samples < len(test):
        test = Subset(test, range(settings.samples))  # the first M images: the same sample on every run
    calibration = get_dataset(dataset, "train", data_dir, timesteps=timesteps, augment=False) \
        if settings.recalibrate else None
    return Measure(test, calibration, settings.recalibrate, train.eval_batch_size, train.amp, dataset)

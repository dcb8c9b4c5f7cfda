"""Measured speed of structured savings on Spikformer-4-384 CIFAR shapes: the dense model, half of every layer's
heads, MLP hidden channels and stem channels removed and compacted, the same at T=2, and that with a firing-rate
token selector at keep 0.7. Weights are freshly initialised: the dense products, not the spikes, set the time.

    python -m benchmarks.structured_speed [--repeats 5] [--batch-size 32] [--threads N]

Prints a Markdown table (the bench figures of `spkprune bench`, measured side by side in one run).
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from spkprune.bench.jobs import run_bench
from spkprune.bench.settings import BenchSettings
from spkprune.checkpoint import Checkpoint, save_checkpoint
from spkprune.compact.compaction import compact_checkpoint
from spkprune.models import create_model
from spkprune.pruning.masks import full_masks
from spkprune.pruning.structured import structured_masks
from spkprune.pruning.structures import structure_groups
from spkprune.store import Store

PRESET = "spikformer-4-384-cifar10"


def _checkpoints(store: Store) -> list[str]:
    torch.manual_seed(0)
    model = create_model(PRESET).eval()
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    meta = {"arch": PRESET, "config": model.config.to_dict()}
    save_checkpoint(store, "dense", "main", Checkpoint(weights, {}, meta))
    groups = structure_groups(model)
    masks = structured_masks(groups, weights, full_masks(weights, model.prunable_weights()), 0.5, scope="layerwise")
    pruned = {k: v * masks[k] if k in masks else v for k, v in weights.items()}
    compacted = compact_checkpoint(Checkpoint(pruned, masks, meta, "half")).checkpoint
    save_checkpoint(store, "half", "main", compacted)
    two = {**compacted.meta, "config": {**compacted.meta["config"], "timesteps": 2}}
    save_checkpoint(store, "half-t2", "main", Checkpoint(compacted.state_dict, compacted.masks, two))
    keep = {**two, "selector": {"keep": 0.7, "scorer": "firing-rate", "locations": [1, 2, 3]}}
    save_checkpoint(store, "half-t2-keep07", "main", Checkpoint(compacted.state_dict, compacted.masks, keep))
    return ["dense", "half", "half-t2", "half-t2-keep07"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        store = Store.open(root)
        refs = _checkpoints(store)
        settings = BenchSettings(refs=refs, batch_size=args.batch_size, repeats=args.repeats, warmup=1,
                                 threads=args.threads, save=False)
        report = run_bench(store, settings, progress=False)
    print("| model | T | latency ms (batch 1) | images/s | speed-up vs dense | dense MMAC |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in report.results:
        print(f"| {row.ref} | {row.timesteps} | {row.latency_ms:.1f} | {row.throughput:.1f} | {row.speedup:.2f}x "
              f"| {row.dense_macs / 1e6:.0f} |")
    print(f"\nmachine: {report.machine}")


if __name__ == "__main__":
    main()

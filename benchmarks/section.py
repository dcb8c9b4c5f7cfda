"""One benchmark section in this process: `python -m benchmarks.section NAME JSON_ARGS` prints `NAME(*ARGS)` as one
JSON line (`benchmarks.run.in_fresh_process` calls it, so that each section starts from a fresh process)."""

from __future__ import annotations

import json
import sys

import torch

from benchmarks import cases, run

SECTIONS = {
    "train_throughput": run.train_throughput,
    "mask_overhead": run.mask_overhead,
    "eval_throughput": run.eval_throughput,
    "export_sizes": cases.export_sizes,
}

if __name__ == "__main__":
    name, args = sys.argv[1], json.loads(sys.argv[2])
    torch.manual_seed(0)
    print(json.dumps(SECTIONS[name](*args)))

"""`spkprune bench` on the digits data, as a user runs it: a quickly trained dense model against its 50% lottery
ticket, in a temporary store, through the command line (each command in its own process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESET = "spikformer-2-64-digits"


def commands(threads: int | None, repeats: int) -> list[list[str]]:
    """The three commands (after `spkprune --store STORE`): train, one IMP round, bench."""
    bench = ["bench", "dense", "ticket@round-1", "--repeats", str(repeats), "--format", "json", "--no-progress"]
    if threads is not None:
        bench += ["--threads", str(threads)]
    return [
        ["train", "--arch", PRESET, "--dataset", "digits", "--name", "dense", "--epochs", "1", "--limit-batches", "5",
         "--no-progress"],
        ["imp", "dense", "--rounds", "1", "--target", "0.5", "--epochs-per-round", "1", "--name", "ticket",
         "--no-progress"],
        bench,
    ]


def bench_digits(threads: int | None, repeats: int) -> dict:
    """Run the three commands; returns them (as typed) and `spkprune bench`'s JSON document."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    steps = commands(threads, repeats)
    with tempfile.TemporaryDirectory() as tmp:
        for args in steps:
            cmd = [sys.executable, "-m", "spkprune", "--store", str(Path(tmp) / "store"), *args]
            result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
            if result.returncode != 0:
                raise RuntimeError(f"{' '.join(args[:1])} failed:\n{result.stderr[-4000:]}")
    return {"commands": [" ".join(["spkprune", *args]) for args in steps], "bench": json.loads(result.stdout)}

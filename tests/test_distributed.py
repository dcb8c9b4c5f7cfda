"""Two CPU processes under torchrun (gloo): DDP keeps both ranks' weights identical, and the CLI trains once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent(
    """
    import hashlib, json, os, sys
    import torch
    from torch.utils.data import Subset
    from spkprune.data import get_dataset
    from spkprune.models import create_model
    from spkprune.training import TrainConfig, fit, distributed

    info = distributed.init_distributed()
    torch.manual_seed(0)
    model = create_model("spikformer-2-64-digits")
    train = Subset(get_dataset("digits", "train"), range(64))
    test = Subset(get_dataset("digits", "test"), range(32))
    cfg = TrainConfig(epochs=1, batch_size=8, lr=2e-3, mixup_alpha=0.5, seed=0)
    result = fit(model, cfg, train_data=train, test_data=test, progress=False)
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode()); digest.update(value.detach().cpu().numpy().tobytes())
    out = {"sha256": digest.hexdigest(), "steps": result.global_step, "world": info.world_size}
    with open(os.path.join(sys.argv[1], f"rank{info.rank}.json"), "w") as f:
        json.dump(out, f)
    distributed.shutdown()
    """
)


def _torchrun(args, tmp_path, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_processes_end_with_identical_weights(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = _torchrun([str(script), str(tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    # 64 samples split over 2 ranks, batch 8 per rank: 4 steps each.
    assert ranks[0]["steps"] == ranks[1]["steps"] == 4
    assert ranks[0]["sha256"] == ranks[1]["sha256"]


def test_cli_train_under_torchrun_writes_the_store_once(tmp_path):
    store = tmp_path / "store"
    proc = _torchrun(
        ["-m", "spkprune", "--store", str(store), "train", "--name", "ddp", "--epochs", "1", "--batch-size", "16",
         "--limit-batches", "2", "--no-progress", "--format", "json"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)  # only rank 0 printed: one JSON document
    assert doc["rows"][0]["name"] == "ddp@main"
    from spkprune.store import Store

    assert sorted(Store.open(store, create=False).tags("ddp")) == ["epoch-1", "init", "main"]

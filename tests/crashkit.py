"""Helpers of tests/test_crash.py: run spkprune commands as processes, SIGKILL them, and fingerprint what they left.

A fingerprint is what must survive a crash bit for bit: a blob's file bytes, a checkpoint's tensors (weights and
masks, without the metadata, whose `created` times differ between runs), an exported folder's files.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from spkprune.checkpoint import load_checkpoint
from spkprune.cli import app
from spkprune.store import Store

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
TIMEOUT_S = 300


def spkprune(store: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "spkprune", "--store", str(store), *args]


# `spkprune` that SIGKILLs itself as soon as the store has committed NAME@TAG (argv[1]): a kill at a chosen moment.
_KILLED_AFTER_SAVING = """
import os, signal, sys
from spkprune.cli import main
from spkprune.store import Store
ref = sys.argv.pop(1)
put = Store.put
def put_then_die(self, *args, **kwargs):
    art = put(self, *args, **kwargs)
    if art.ref == ref:
        os.kill(os.getpid(), signal.SIGKILL)
    return art
Store.put = put_then_die
main()
"""


def spkprune_killed_after_saving(ref: str, store: Path, *args: str) -> list[str]:
    return [sys.executable, "-c", _KILLED_AFTER_SAVING, ref, "--store", str(store), *args]


@dataclass
class Finished:
    returncode: int
    seconds: float
    stdout: str
    stderr: str


def run_to_end(cmd: list[str], cwd: Path | None = None) -> Finished:
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT_S)
    return Finished(done.returncode, time.perf_counter() - started, done.stdout, done.stderr)


@dataclass
class Kill:
    command: str
    delay: float
    already_finished: bool  # the process had exited on its own before the kill was due
    left: str = ""  # what the killed command had written by then, to show where the kill landed

    def __repr__(self) -> str:  # what assertion messages show
        late = " (it had already finished)" if self.already_finished else ""
        return f"SIGKILL of `{self.command}` after {self.delay:.2f} s{late}, leaving {self.left or 'nothing'}"


def kill_after(cmd: list[str], delay: float, cwd: Path | None = None) -> Kill:
    """Start `cmd`, SIGKILL it `delay` seconds later, reap it."""
    # Output goes to /dev/null: a full pipe would stall the process and move the moment it is killed at.
    proc = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=delay)
        finished = True
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        finished = False
    shown = " ".join(cmd[cmd.index("--store") + 2:])
    return Kill(shown, delay, finished)


# ------------------------------------------------------------------------------------------------ the store
def blob_digests(root: Path) -> dict[str, str]:
    """ref -> sha256 of its blob file's bytes, checked against the index's sha256."""
    digests = {}
    for art in Store.open(root, create=False).list():
        digest = hashlib.sha256(art.path.read_bytes()).hexdigest()
        assert digest == art.sha256, f"{art.ref}: blob bytes do not match the index"
        digests[art.ref] = digest
    return digests


def ls_json(root: Path) -> list[dict]:
    """`spkprune ls --format json`, asserting that it exits 0."""
    result = CliRunner().invoke(app, ["--store", str(root), "ls", "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key]
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def weights_digest(root: Path, ref: str) -> str:
    """sha256 of a checkpoint's weights and masks, in sorted key order."""
    ckpt = load_checkpoint(ref, Store.open(root, create=False))
    masks = {f"__mask__.{key}": mask for key, mask in ckpt.masks.items()}
    return tensors_digest({**ckpt.state_dict, **masks})


def run_digests(root: Path, name: str) -> dict[str, str]:
    """Every tag of NAME: its weights digest for a checkpoint, its kind for anything else (e.g. a training state
    left behind), so that two runs compare equal only with the same tags holding the same tensors."""
    store = Store.open(root, create=False)
    return {
        art.tag: weights_digest(root, art.ref) if art.kind == "checkpoint" else f"kind {art.kind}"
        for art in store.list(name)
    }


# ---------------------------------------------------------------------------------------------- exports
def file_digests(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def without_created(value):
    """A JSON value without its `created` entries (at any depth): the one field that differs between equal runs."""
    if isinstance(value, dict):
        return {k: without_created(v) for k, v in value.items() if k != "created"}
    if isinstance(value, list):
        return [without_created(v) for v in value]
    return value


def safetensors_content(path: Path) -> tuple[str, dict]:
    """(digest of the tensors, header metadata with JSON values parsed and `created` times dropped)."""
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        metadata = handle.metadata() or {}
    parsed = {}
    for key, text in metadata.items():
        try:
            parsed[key] = without_created(json.loads(text))
        except json.JSONDecodeError:
            parsed[key] = text
    return tensors_digest(load_file(path)), parsed

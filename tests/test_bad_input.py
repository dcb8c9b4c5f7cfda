"""A corpus of bad inputs, each run through the CLI against a small store; then the store's own checks of a
damaged index or an unusable directory, through the library.

Every case must exit 2 with exactly one non-empty stderr line starting with `error:`, print no traceback, create
none of its forbidden files (a payload's marker) and leave every file under the store byte-identical.

To add a case, add one `BadInput` to `CASES`: the arguments after `--store` (with `{tmp}` for the test's temporary
directory and `{store}` for the store), a regex the error line must match, and optionally a `setup(tmp, store)`
that writes the bad input first.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import sqlite3
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from spkprune.cli import app
from spkprune.errors import SpkpruneError
from spkprune.store import CorruptRowError, Store
from spkprune.store.store import BLOB_DIR

DIGITS = "spikformer-2-64-digits"
HAS_PROC = Path("/proc/self").is_dir()


@dataclass(frozen=True)
class BadInput:
    id: str
    args: tuple[str, ...]  # after `--store STORE`; {tmp} and {store} are filled in
    error: str  # regex searched in the one error line
    setup: Callable[[Path, Path], None] | None = None  # setup(tmp, store) writes the bad input
    store: str = "{store}"  # the --store value
    must_not_exist: tuple[str, ...] = ()  # e.g. the marker file a payload would create
    needs_proc: bool = False


# ----------------------------------------------------------------------------------------- bad inputs
class _Call:
    """Pickles as `func(*args)`: what a crafted file runs under a plain pickle.load."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _cifar_files(tmp: Path, name: str) -> list[Path]:
    if name == "cifar10":
        folder, files = tmp / "data" / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    else:
        folder, files = tmp / "data" / "cifar-100-python", ["train", "test"]
    folder.mkdir(parents=True, exist_ok=True)
    return [folder / f for f in files]


def _cifar_payload(name: str, payload: str) -> Callable[[Path, Path], None]:
    """Every batch file of `name` carries a payload that would create {tmp}/pwned under pickle.load."""

    def setup(tmp: Path, store: Path) -> None:
        import builtins

        marker = tmp / "pwned"
        call = {
            "os.system": _Call(os.system, f"touch {marker}"),
            "builtins.eval": _Call(builtins.eval, f"open({str(marker)!r}, 'w')"),
            "subprocess.call": _Call(subprocess.call, ["touch", str(marker)]),
        }[payload]
        for path in _cifar_files(tmp, name):
            entry = {b"data": np.zeros((1, 3072), dtype=np.uint8), b"labels": [0], b"batch_label": call}
            path.write_bytes(pickle.dumps(entry, protocol=2))

    return setup


def _cifar_garbage(kind: str) -> Callable[[Path, Path], None]:
    def setup(tmp: Path, store: Path) -> None:
        real = pickle.dumps({b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [0, 1]}, protocol=2)
        content = {"random": np.random.default_rng(0).bytes(4096), "truncated": real[: len(real) // 2]}[kind]
        for path in _cifar_files(tmp, "cifar10"):
            path.write_bytes(content)

    return setup


def _index_sql(sql: str) -> Callable[[Path, Path], None]:
    def setup(tmp: Path, store: Path) -> None:
        con = sqlite3.connect(store / "index.sqlite")
        con.execute(sql)
        con.commit()
        con.close()

    return setup


def _damage_index(tmp: Path, store: Path) -> None:
    index = store / "index.sqlite"
    data = bytearray(index.read_bytes())
    data[100:4096] = b"\xff" * (4096 - 100)  # the schema page
    index.write_bytes(bytes(data))


def _weights_file(tmp: Path, store: Path) -> None:
    from safetensors.torch import save_file

    from spkprune.models import create_model

    save_file({k: v.contiguous() for k, v in create_model(DIGITS).state_dict().items()}, tmp / "w.safetensors")


def _project_dir(tmp: Path, store: Path) -> None:
    (tmp / "project").mkdir()
    (tmp / "project" / "README").write_text("mine")
    _weights_file(tmp, store)


def _regular_file(tmp: Path, store: Path) -> None:
    (tmp / "file").write_text("in the way")


def _odd_blob(tmp: Path, store: Path) -> None:
    from safetensors.torch import save_file

    meta = {"format": "spkprune.checkpoint", "format_version": "1", "meta": "[1, 2]"}
    save_file({"w": torch.zeros(2)}, tmp / "odd.safetensors", metadata=meta)


def _future_export(tmp: Path, store: Path) -> None:
    import json

    from safetensors.torch import save_file

    from spkprune.models import create_model

    folder = tmp / "export"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in create_model(DIGITS).state_dict().items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"format": "dense", "format_version": "99", "arch": DIGITS}))


def _recipe(body: str) -> Callable[[Path, Path], None]:
    def setup(tmp: Path, store: Path) -> None:
        (tmp / "r.yaml").write_text(body)

    return setup


def _trained_digits(tmp: Path, store: Path) -> None:
    """`dense` and `dense@init`: a digits checkpoint with a training configuration, as imp needs it."""
    from spkprune.checkpoint import Checkpoint, save_checkpoint
    from spkprune.models import create_model
    from spkprune.training import TrainConfig

    model = create_model(DIGITS)
    meta = {"arch": DIGITS, "config": model.config.to_dict(), "selector": None, "train": TrainConfig().to_dict()}
    for tag in ("init", "main"):
        save_checkpoint(Store.open(store), "dense", tag, Checkpoint(model.state_dict(), {}, meta))


def _untrained(store: Path, preset: str, name: str, **overrides) -> None:
    """An untrained `preset` in the store as `name` (@main, @init), with a training configuration as `train` leaves."""
    from spkprune.checkpoint import Checkpoint, save_checkpoint
    from spkprune.models import create_model
    from spkprune.training import TrainConfig

    model = create_model(preset, **overrides)
    meta = {"arch": preset, "config": model.config.to_dict(), "train": TrainConfig().to_dict()}
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_checkpoint(Store.open(store), name, "main", Checkpoint(weights, {}, meta))
    save_checkpoint(Store.open(store), name, "init", Checkpoint(weights, {}, meta))


def _one_block_digits(tmp: Path, store: Path) -> None:
    """`shallow`: a one-block digits Spikformer, which has no place for a token selector."""
    from spkprune.checkpoint import Checkpoint, save_checkpoint
    from spkprune.models import create_model

    model = create_model(DIGITS, depth=1)
    meta = {"arch": DIGITS, "config": model.config.to_dict(), "selector": None}
    save_checkpoint(Store.open(store), "shallow", "main", Checkpoint(model.state_dict(), {}, meta))


def _sdt_checkpoint(tmp: Path, store: Path) -> None:
    """An (untrained) Spike-driven Transformer `sdt` in the store."""
    _untrained(store, "sdt-2-64-digits", "sdt")


def _qkformer_checkpoint(tmp: Path, store: Path) -> None:
    """An (untrained) QKFormer `qk` in the store."""
    _untrained(store, "qkformer-3-64-digits", "qk")


def _sdt_ratio_1_checkpoint(tmp: Path, store: Path) -> None:
    """An (untrained) SDT `sdt` with MLP ratio 1: its hidden channels take a shortcut, so it has no MLP structures."""
    _untrained(store, "sdt-2-64-digits", "sdt", mlp_ratio=1)


_FLOPS = ("flops", "report", "spikformer-4-384-cifar10", "--dataset", "cifar10", "--data-dir", "{tmp}/data")
_NOT_A_BATCH = r"is not a CIFAR python batch file"
_REFUSED = _NOT_A_BATCH + r": it pickles {}, which the data set never holds \(refused without running it\); re-download"
_IMPORT = ("import", "{tmp}/w.safetensors", "--arch", DIGITS, "--name", "imported")

CASES = [
    # A crafted CIFAR batch file: refused before anything it names runs (spkprune/data/safe_pickle.py).
    BadInput("cifar10-payload-os-system-flops", _FLOPS, "test_batch " + _REFUSED.format(r"posix\.system"),
             _cifar_payload("cifar10", "os.system"), must_not_exist=("{tmp}/pwned",)),
    # Protocol 2 writes Python 2 names: builtins.eval as __builtin__.eval, subprocess.call as commands.call.
    BadInput("cifar10-payload-eval-flops", _FLOPS, _REFUSED.format(r"__builtin__\.eval"),
             _cifar_payload("cifar10", "builtins.eval"), must_not_exist=("{tmp}/pwned",)),
    BadInput("cifar100-payload-subprocess-flops",
             ("flops", "report", "spikformer-4-384-cifar100", "--dataset", "cifar100", "--data-dir", "{tmp}/data"),
             "cifar-100-python/test " + _REFUSED.format(r"commands\.call"),
             _cifar_payload("cifar100", "subprocess.call"), must_not_exist=("{tmp}/pwned",)),
    BadInput("cifar10-payload-os-system-train",
             ("train", "--dataset", "cifar10", "--data-dir", "{tmp}/data", "--name", "run", "--epochs", "1"),
             _REFUSED.format(r"posix\.system"), _cifar_payload("cifar10", "os.system"),
             must_not_exist=("{tmp}/pwned",)),
    BadInput("cifar10-random-bytes", _FLOPS, _NOT_A_BATCH + r" \(UnpicklingError: .*\); re-download https://",
             _cifar_garbage("random")),
    BadInput("cifar10-truncated", _FLOPS, _NOT_A_BATCH + r" \(.*\); re-download https://", _cifar_garbage("truncated")),
    # A damaged store: its index (spkprune/store/index.py).
    BadInput("store-version-not-a-number", ("ls",), r"has an unreadable format version 'one' in index.sqlite",
             _index_sql("UPDATE store_info SET value = 'one' WHERE key = 'version'")),
    BadInput("store-version-not-a-number-show", ("show", "net"), r"unreadable format version ''",
             _index_sql("UPDATE store_info SET value = '' WHERE key = 'version'")),
    BadInput("store-corrupt-meta-show", ("show", "net"),
             r"artifact net@main has a corrupt index row in .*: its metadata is not JSON .*\(spkprune rm net@main\)",
             _index_sql("UPDATE artifacts SET meta = '{\"arch\": ' WHERE name = 'net'")),
    BadInput("store-meta-not-an-object-show", ("show", "net@main"), r"its metadata is a JSON list, not an object",
             _index_sql("UPDATE artifacts SET meta = '[1]' WHERE name = 'net'")),
    BadInput("store-damaged-index", ("ls",), r"index.sqlite is not a spkprune store index \(", _damage_index),
    # --store pointing somewhere that is not a store (spkprune/store/store.py: Store.open / Store.existing).
    BadInput("store-is-proc-ls", ("ls",), r"^error: /proc exists and is not a spkprune store", store="/proc",
             needs_proc=True),
    BadInput("store-is-proc-show", ("show", "net"), r"/proc exists and is not a spkprune store", store="/proc",
             needs_proc=True),
    BadInput("store-under-proc-import", _IMPORT, r"cannot create a spkprune store at /proc/spkprune-test-store \(",
             _weights_file, store="/proc/spkprune-test-store", needs_proc=True),
    BadInput("store-missing-under-proc-ls", ("ls",), r"no spkprune store at /proc/spkprune-x, and none can be made there",
             store="/proc/spkprune-x", needs_proc=True),
    BadInput("store-is-a-file", ("ls",), r"store path .*index.sqlite is a file, not a store directory",
             store="{store}/index.sqlite"),
    BadInput("store-is-someone-elses-directory-import", _IMPORT, r"project exists and is not a spkprune store",
             _project_dir, store="{tmp}/project"),
    # Output paths are checked before any work (no training round runs before a bad --plot is found).
    BadInput("export-out-under-proc", ("export", "net", "--out", "/proc/spkprune-x"), r"cannot write in /proc",
             needs_proc=True),
    BadInput("export-out-under-a-file", ("export", "net", "--out", "{tmp}/file/sub"), r"which is a file, not a folder",
             _regular_file),
    BadInput("select-tokens-analyze-out-is-a-file", ("select-tokens", "net", "--analyze", "--out", "{tmp}/file"),
             r"--out '.*file' is a file, not a folder", _regular_file),
    BadInput("imp-plot-under-proc", ("imp", "net", "--name", "t", "--plot", "/proc/spkprune-x.png"),
             r"--plot '/proc/spkprune-x.png': cannot write in '/proc'", needs_proc=True),
    BadInput("imp-plot-under-a-file", ("imp", "net", "--name", "t", "--plot", "{tmp}/file/p.png"),
             r"is a file, so nothing can be written below it", _regular_file),
    # Values out of bounds, checked by the command's settings.
    BadInput("evaluate-batch-size-0", ("evaluate", "net", "--batch-size", "0"), r"^error: --batch-size: must be >= 1"),
    BadInput("evaluate-batch-size-negative", ("evaluate", "net", "--batch-size", "-1"), r"--batch-size: must be >= 1"),
    BadInput("train-save-iter-negative", ("train", "--name", "x", "--save-iter", "-5"), r"--save-iter: must be >= 1"),
    BadInput("imp-target-1", ("imp", "net", "--name", "t", "--target", "1"), r"^error: --target: must be < 1"),
    BadInput("select-tokens-keep-2", ("select-tokens", "net", "--name", "s", "--keep", "2"),
             r"--keep: each keep ratio must lie in \(0, 1\]"),
    BadInput("export-bad-revision-dry-run",
             ("export", "net", "--out", "{tmp}/o", "--push-to-hub", "org/repo", "--revision", "bad rev..", "--dry-run"),
             r"--revision: must be a valid branch name"),
    BadInput("export-revision-without-push", ("export", "net", "--out", "{tmp}/o", "--revision", "main"),
             r"--revision only apply to a push"),
    BadInput("bench-batch-size-0", ("bench", "net", "--batch-size", "0"),
             r"^error: --batch-size: must be >= 1 \(got 0\)"),
    BadInput("bench-repeats-0", ("bench", "net", "--repeats", "0"), r"^error: --repeats: must be >= 1 \(got 0\)"),
    BadInput("bench-unknown-ref", ("bench", DIGITS, "no-such-net"),
             r"'no-such-net' is neither a preset .* nor a checkpoint"),
    BadInput("bench-save-a-preset", ("bench", DIGITS, "--save"),
             r"--save keeps the result with checkpoints in the store"),
    BadInput("bench-missing-ref", ("bench",), r"^error: bench: missing argument 'REF' \(see spkprune bench --help\)$"),
    # Structured pruning (spkprune imp --granularity channel): checked before round 0 is written.
    BadInput("imp-structures-bogus", ("imp", "net", "--name", "t", "--granularity", "channel", "--structures", "bogus"),
             r"^error: --structures: must name one or more of heads, mlp, stem \(got 'bogus'\)$"),
    BadInput("imp-structures-without-channel", ("imp", "net", "--name", "t", "--structures", "heads"),
             r"^error: structures only apply with granularity channel$"),
    BadInput("imp-channel-every-head-of-a-layer",
             ("imp", "dense", "--name", "t", "--granularity", "channel", "--structures", "heads", "--scope", "layerwise",
              "--rounds", "2", "--target", "0.9"),
             r"level 0\.9 would remove every head of block\.0\.attn \(4 of 4\); each layer keeps at least one",
             _trained_digits),
    BadInput("imp-channel-more-heads-than-can-go",
             ("imp", "dense", "--name", "t", "--granularity", "channel", "--structures", "heads", "--target", "0.9"),
             r"would remove 7 of the 8 structures \(heads\), but each layer keeps at least one .* at most 6 can go",
             _trained_digits),
    # One-shot pruning (spkprune imp --one-shot): one round to a target from the source's weights.
    BadInput("imp-one-shot-rounds", ("imp", "net", "--name", "t", "--one-shot", "--rounds", "3"),
             r"^error: one_shot prunes in a single round; rounds must be 1 \(got 3\)$"),
    BadInput("imp-one-shot-rate", ("imp", "net", "--name", "t", "--one-shot", "--rate", "0.2"),
             r"^error: one_shot prunes straight to a target; give target, not rate$"),
    BadInput("imp-one-shot-rewind", ("imp", "net", "--name", "t", "--one-shot", "--rewind", "epoch:1"),
             r"^error: one_shot starts from the source's own weights; rewind epoch:1 does not apply$"),
    BadInput("imp-one-shot-epochs-per-round", ("imp", "net", "--name", "t", "--one-shot", "--epochs-per-round", "2"),
             r"^error: epochs_per_round does not apply with one_shot; its fine-tune is finetune_epochs$"),
    BadInput("imp-finetune-without-one-shot", ("imp", "net", "--name", "t", "--finetune-epochs", "2"),
             r"^error: finetune_epochs only applies with one_shot$"),
    BadInput("imp-one-shot-recalibrate-negative", ("imp", "net", "--name", "t", "--one-shot", "--recalibrate-batches", "-1"),
             r"^error: --recalibrate-batches: must be >= 0 \(got -1\)$"),
    # Compaction and fewer time steps (spkprune compact, train --timesteps).
    BadInput("compact-nothing-to-remove", ("compact", "dense", "--name", "small"),
             r"^error: dense@main has nothing to remove: every attention head, MLP hidden channel and patch-splitting "
             r"channel can change its outputs", _trained_digits),
    BadInput("compact-name-taken", ("compact", "dense", "--name", "dense"),
             r"^error: dense@main already exists in the store; choose another --name or pass --overwrite$", _trained_digits),
    BadInput("compact-unknown-ref", ("compact", "nosuch", "--name", "small"), r"nosuch"),
    BadInput("compact-missing-name", ("compact", "net"), r"^error: compact: missing option '--name'"),
    BadInput("train-timesteps-0", ("train", "--name", "x", "--timesteps", "0"), r"^error: --timesteps: must be >= 1 \(got 0\)$"),
    BadInput("train-init-timesteps-0", ("train", "--init", "dense", "--name", "x", "--timesteps", "0"),
             r"^error: --timesteps: must be >= 1 \(got 0\)$", _trained_digits),
    # Sensitivity scans and the allocations drawn from them (spkprune sensitivity, imp --allocation sensitivity).
    BadInput("sensitivity-ratio-0", ("sensitivity", "dense", "--ratios", "0,0.5"),
             r"^error: --ratios: must be > 0 \(got '0'\)$", _trained_digits),
    BadInput("sensitivity-ratio-1", ("sensitivity", "dense", "--ratios", "0.5,1"),
             r"^error: --ratios: must be < 1 \(got '1'\)$", _trained_digits),
    BadInput("sensitivity-no-ratios", ("sensitivity", "dense", "--ratios", ","),
             r"^error: --ratios: give one or more ratios strictly between 0 and 1", _trained_digits),
    BadInput("sensitivity-locations-of-a-one-block-model", ("sensitivity", "shallow", "--over", "locations"),
             r"^error: sensitivity --over locations: spikformer-2-64-digits has no selector locations \(a token "
             r"selector needs at least 2 blocks; it has 1\)$", _one_block_digits),
    BadInput("sensitivity-not-a-store-ref", ("sensitivity", "{tmp}/w.safetensors"),
             r"^error: sensitivity needs a store reference NAME\[@TAG\]", _weights_file),
    BadInput("imp-allocation-without-a-scan", ("imp", "dense", "--name", "t", "--allocation", "sensitivity"),
             r"^error: --allocation sensitivity needs a sensitivity scan of dense@main over layers: run spkprune "
             r"sensitivity dense@main --over layers first$", _trained_digits),
    BadInput("imp-allocation-with-channels",
             ("imp", "dense", "--name", "t", "--allocation", "sensitivity", "--granularity", "channel"),
             r"^error: allocation sensitivity sets each layer's sparsity itself", _trained_digits),
    BadInput("select-tokens-keep-allocation-without-a-scan",
             ("select-tokens", "dense", "--name", "s", "--keep-allocation", "sensitivity"),
             r"^error: --keep-allocation sensitivity needs a sensitivity scan of dense@main over locations", _trained_digits),
    # Usage mistakes: one line in the same format, not click's usage box.
    BadInput("missing-argument", ("imp",), r"^error: imp: missing argument 'REF' \(see spkprune imp --help\)$"),
    BadInput("not-an-integer", ("imp", "net", "--name", "t", "--rounds", "five"), r"^error: imp: invalid value for '--rounds'"),
    BadInput("unknown-command", ("prnue",), r"^error: no such command 'prnue'"),
    BadInput("unknown-option", ("imp", "net", "--bogus"), r"^error: imp: no such option: --bogus"),
    BadInput("bad-choice", ("imp", "net", "--name", "t", "--scope", "local"), r"'local' is not one of 'global', 'layerwise'"),
    # Files that are not what they claim.
    BadInput("blob-meta-not-an-object", ("show", "{tmp}/odd.safetensors"), r"its metadata is a JSON array", _odd_blob),
    BadInput("export-from-a-newer-spkprune", ("show", "{tmp}/export"), r"format_version|version", _future_export),
    BadInput("reference-with-a-newline", ("evaluate", "a\nb"), r"^error: 'a\\nb' does not exist"),
    # Recipes: everything is checked before a stage runs.
    BadInput("recipe-missing-data-dir", ("run", "{tmp}/r.yaml"), r"stages.dense.data_dir: folder .* does not exist",
             _recipe(f"model: {DIGITS}\ndata: {{data_dir: /no/such/dir}}\nstages:\n  dense: {{type: train, epochs: 1}}\n")),
    BadInput("recipe-missing-input-file", ("run", "{tmp}/r.yaml"), r"stages.flops.from: .*missing.safetensors does not exist",
             _recipe("stages:\n  flops: {type: flops, from: ./missing.safetensors}\n")),
    BadInput("recipe-bad-value", ("run", "{tmp}/r.yaml"), r"stages.dense.epochs: must be >= 1 \(got 0\)",
             _recipe(f"model: {DIGITS}\nstages:\n  dense: {{type: train, epochs: 0}}\n")),
    # Structures and compaction of the SDT and QKFormer families (spkprune/models/structure_sites.py).
    BadInput("compact-sdt-nothing-to-remove", ("compact", "sdt", "--name", "c"),
             r"^error: sdt@main has nothing to remove: every attention head, MLP hidden channel and patch-splitting "
             r"channel can change its outputs", _sdt_checkpoint),
    BadInput("channel-imp-sdt-unknown-structure",
             ("imp", "sdt", "--name", "t", "--granularity", "channel", "--structures", "heads,tokens"),
             r"^error: --structures: must name one or more of heads, mlp, stem", _sdt_checkpoint),
    BadInput("channel-imp-qkformer-unknown-structure",
             ("imp", "qk", "--name", "t", "--granularity", "channel", "--structures", "stem,blocks"),
             r"^error: --structures: must name one or more of heads, mlp, stem", _qkformer_checkpoint),
    BadInput("channel-imp-sdt-ratio-1-mlp",
             ("imp", "sdt", "--name", "t", "--granularity", "channel", "--structures", "mlp", "--rounds", "1"),
             r"^error: --structures mlp: sdt-2-64-digits has no mlp structures; choose from heads, stem$",
             _sdt_ratio_1_checkpoint),
    BadInput("compact-qkformer-nothing-to-remove", ("compact", "qk", "--name", "c"),
             r"^error: qk@main has nothing to remove: ", _qkformer_checkpoint),
    # Token skipping (select-tokens --action skip) is training-free, with a weightless scorer.
    BadInput("select-tokens-skip-learned",
             ("select-tokens", "net", "--name", "s", "--action", "skip", "--scorer", "learned"),
             r"^error: --action skip is training-free \(TP-Spikformer's early stopping\): use --scorer firing-rate or "
             r"random with --epochs 0"),
    BadInput("select-tokens-skip-epochs", ("select-tokens", "net", "--name", "s", "--action", "skip", "--epochs", "2"),
             r"^error: --action skip is training-free"),
    BadInput("select-tokens-unknown-action", ("select-tokens", "net", "--name", "s", "--action", "delete"),
             r"--action"),
    # flops report on the Spike-driven Transformer and QKFormer families.
    BadInput("flops-keep-without-selector-locations", ("flops", "report", "sdt-2-256-cifar10dvs", "--keep", "0.5"),
             r"^error: --keep gathers tokens before the selector locations and sdt-2-256-cifar10dvs has none \(dvs_mode"),
    BadInput("flops-keep-leaves-no-token-in-a-stage", ("flops", "report", "qkformer-3-64-digits", "--keep", "0.1"),
             r"^error: keep ratio 0.1 before block 2 leaves 0 of 4 tokens$"),
    BadInput("flops-dataset-another-family-does-not-fit", ("flops", "report", "sdt-2-64-digits", "--dataset", "cifar10"),
             r"^error: dataset cifar10 \(images 3x32x32\) does not fit sdt-2-64-digits, which expects images 1x8x8"),
    BadInput("flops-keep-with-data-qkformer",
             ("flops", "report", "qkformer-3-64-digits", "--keep", "0.5", "--dataset", "digits"), r"what-if without data"),
]


# ------------------------------------------------------------------------------------------------ the check
def make_store(root: Path) -> Path:
    store = Store.open(root)
    meta = {"arch": DIGITS, "metrics": {"top1": 0.5}}
    store.put("net", "main", {"w": torch.arange(6, dtype=torch.float32)}, {"format": "x"}, meta)
    store.put("net", "init", {"w": torch.zeros(6)}, {}, {"arch": DIGITS}, parent=None)
    return root


def file_hashes(root: Path) -> dict[str, str]:
    """Every file and folder under `root`, files with the sha256 of their bytes."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        for path in sorted(root.rglob("*"))
    }


def run_cli(*args: str):
    try:
        runner = CliRunner(mix_stderr=False)  # click < 8.2 mixes stderr into stdout unless told not to
    except TypeError:
        runner = CliRunner()  # click >= 8.2 keeps result.stderr apart
    return runner.invoke(app, list(args))


def assert_one_error_line(result, pattern: str) -> None:
    shown = (result.exit_code, result.stdout, result.stderr, repr(result.exception))
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), shown
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].strip() != "error:", shown
    assert "Traceback" not in result.output + result.stderr + result.stdout, shown
    assert re.search(pattern, lines[0]), (pattern, lines[0])


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_one_error_line_and_changes_nothing(case: BadInput, tmp_path: Path, one_thread):
    if case.needs_proc and not HAS_PROC:
        pytest.skip("needs Linux /proc")
    store = make_store(tmp_path / "store")
    if case.setup:
        case.setup(tmp_path, store)
    fill = {"tmp": str(tmp_path), "store": str(store)}
    before = file_hashes(store)

    result = run_cli("--store", case.store.format(**fill), *(arg.format(**fill) for arg in case.args))

    assert_one_error_line(result, case.error)
    assert file_hashes(store) == before
    for path in case.must_not_exist:
        assert not Path(path.format(**fill)).exists(), f"{path} was created: the payload ran"


def test_case_ids_are_unique():
    assert len({case.id for case in CASES}) == len(CASES)


# ----------------------------------------------------------------------------- the store through the library
@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "store")


@pytest.mark.parametrize("version", ["one", "", "1.0", "-1", "1; DROP TABLE artifacts"])
def test_a_non_numeric_store_version_is_one_line(store: Store, version: str):
    set_index(store, "UPDATE store_info SET value = ? WHERE key = 'version'", (version,))
    for open_store in (Store.open, Store.existing, lambda root: Store.open(root, create=False)):
        with pytest.raises(SpkpruneError, match=r"unreadable format version .*\(expected a whole number") as err:
            open_store(store.root)
        assert "\n" not in str(err.value) and err.value.__cause__ is None


def set_index(store: Store, sql: str, args: tuple = ()) -> None:
    con = sqlite3.connect(store.index_path)
    con.execute(sql, args)
    con.commit()
    con.close()


CORRUPT_ROWS = {  # column -> value, and what the error says about it
    "meta": ("{not json", r"its metadata is not JSON \(Expecting property name"),
    "meta ": ("[1, 2]", r"its metadata is a JSON list, not an object"),
    "size": ("many", r"size 'many' is not a byte count"),
    "sha256": ("../../../../outside", r"sha256 '../../../../outside' is not 64 hex digits"),
}


@pytest.mark.parametrize("column", list(CORRUPT_ROWS))
def test_a_corrupt_index_row_is_named_and_the_others_still_list(store: Store, column: str):
    for name in ("a", "b", "c"):
        store.put(name, "main", {"w": torch.full((2,), float(ord(name)))}, {}, {"n": name})
    value, problem = CORRUPT_ROWS[column]
    set_index(store, f"UPDATE artifacts SET {column.strip()} = ? WHERE name = 'b'", (value,))

    arts, corrupt = store.scan()
    assert [a.ref for a in arts] == ["a@main", "c@main"] and [e.ref for e in corrupt] == ["b@main"]
    message = str(corrupt[0])
    assert re.search(r"artifact b@main has a corrupt index row in .*index.sqlite: " + problem, message), message
    assert message.endswith("delete the tag (spkprune rm b@main) and re-create it") and "\n" not in message
    for strict in (store.list, lambda: store.resolve("b"), lambda: store.get("b", "main")):
        with pytest.raises(CorruptRowError, match="b@main has a corrupt index row"):
            strict()
    assert store.resolve("c").meta == {"n": "c"} and store.list("a")[0].ref == "a@main"

    assert store.delete("b", "main") == "b@main"  # the advice works: rm never parses the bad row
    assert [a.ref for a in store.list()] == ["a@main", "c@main"]


def test_a_crafted_sha256_never_makes_rm_delete_outside_the_store(store: Store, tmp_path: Path):
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(b"someone else's file")
    store.put("a", "main", {"w": torch.ones(2)})
    # blobs/<sha[:2]>/<sha>.safetensors with sha = "../../victim" would resolve to tmp_path/victim.safetensors
    crafted = os.path.relpath(tmp_path / "victim", store.root / BLOB_DIR / "..")
    assert (store.root / BLOB_DIR / crafted[:2] / f"{crafted}.safetensors").resolve() == victim.resolve()
    set_index(store, "UPDATE artifacts SET sha256 = ? WHERE name = 'a'", (crafted,))
    store.delete("a", "main")
    store.gc()
    assert victim.read_bytes() == b"someone else's file" and store.scan() == ([], [])


def test_existing_is_none_for_a_missing_path_or_an_empty_directory(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    assert Store.existing(tmp_path / "missing") is None and Store.existing(tmp_path / "empty") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"] and not any((tmp_path / "empty").iterdir())


def test_a_directory_that_cannot_be_listed_is_not_a_store(tmp_path: Path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "x").write_text("x")

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", denied)  # what chmod 000 does for a non-root user
    for open_store in (Store.existing, Store.open):
        with pytest.raises(SpkpruneError, match=r"locked is not a spkprune store this process can use: Permission "
                                                r"denied; pass --store with a new or empty directory you can write"):
            open_store(locked)


def test_a_store_that_cannot_be_created_is_one_line(tmp_path: Path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SpkpruneError, match=r"cannot create a spkprune store at .*file/store \(Not a directory\)"):
        Store.open(tmp_path / "file" / "store")

    def unwritable(*args, **kwargs):
        raise sqlite3.OperationalError("unable to open database file")

    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(sqlite3, "connect", unwritable)  # an empty directory SQLite cannot write in
    with pytest.raises(SpkpruneError, match=r"cannot create a spkprune store at .*empty \(unable to open database "
                                            r"file\); pass --store with a new or empty directory you can write"):
        Store.open(tmp_path / "empty")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_proc_is_never_taken_for_an_empty_store():
    for open_store in (Store.existing, Store.open):
        with pytest.raises(SpkpruneError, match=r"^/proc exists and is not a spkprune store"):
            open_store("/proc")
    with pytest.raises(SpkpruneError, match=r"^cannot create a spkprune store at /proc/spkprune-store-\d+ \("):
        Store.open(f"/proc/spkprune-store-{os.getpid()}")


def test_a_damaged_index_is_one_line_on_every_read(store: Store):
    store.put("a", "main", {"w": torch.ones(2)})
    _damage_index(store.root.parent, store.root)
    with pytest.raises(SpkpruneError, match=r"index.sqlite is not a spkprune store index \(") as err:
        Store.open(store.root)
    assert "\n" not in str(err.value)
    with pytest.raises(SpkpruneError, match=r"the store index .*index.sqlite cannot be used \("):
        store.list()

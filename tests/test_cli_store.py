"""`spkprune ls`, `show` and `rm` through the CLI, and the bad-input contract: exit 2, one line, store unchanged."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from spkprune.checkpoint import Checkpoint, save_checkpoint
from spkprune.cli import app
from spkprune.store import Store
from spkprune.store.store import BLOB_DIR, INDEX_FILE

DIGITS = "spikformer-2-64-digits"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits_state():
    from spkprune.models import create_model

    torch.manual_seed(1)
    model = create_model(DIGITS)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def store(tmp_path: Path, digits_state) -> Store:
    """base@init -> base@main -> ticket@round-1 (half of fc1 pruned, with metrics)."""
    model, state = digits_state
    store = Store.open(tmp_path / "store")
    meta = {"arch": DIGITS, "config": model.config.to_dict(), "selector": None, "seed": 5}
    save_checkpoint(store, "base", "init", Checkpoint(state, {}, meta))
    save_checkpoint(store, "base", "main", Checkpoint(state, {}, {**meta, "metrics": {"top1": 0.9}}), parent="base@init")
    key = "block.0.mlp.fc1_linear.weight"
    mask = torch.ones_like(state[key], dtype=torch.bool)
    mask[:128] = False
    pruned = dict(state, **{key: state[key] * mask})
    save_checkpoint(store, "ticket", "round-1", Checkpoint(pruned, {key: mask}, {**meta, "metrics": {"top1": 0.8}}),
                    parent="base")
    return store


def cli(store_root: Path, *args: str):
    return CliRunner().invoke(app, ["--store", str(store_root), *args])


def snapshot(root: Path) -> tuple:
    import sqlite3

    con = sqlite3.connect(root / INDEX_FILE)
    try:
        rows = con.execute("SELECT * FROM artifacts ORDER BY name, tag").fetchall()
    finally:
        con.close()
    blobs = sorted((str(p.relative_to(root)), p.read_bytes()) for p in (root / BLOB_DIR).rglob("*") if p.is_file())
    return rows, blobs


def assert_user_error(result, pattern: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in result.output and result.stdout == ""


# --------------------------------------------------------------------------------------------------- ls
def test_ls_json_lists_every_artifact_with_lineage_fields(store: Store, digits_state):
    result = cli(store.root, "ls", "--format", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    by_ref = {r["ref"]: r for r in rows}
    assert list(by_ref) == ["base@init", "base@main", "ticket@round-1"]
    ticket = by_ref["ticket@round-1"]
    art = store.resolve("ticket@round-1")
    assert ticket == {
        "ref": "ticket@round-1", "kind": "checkpoint", "arch": DIGITS, "parent": "base",
        "sparsity": art.meta["sparsity"]["prunable"], "top1": 0.8, "size": art.size, "created": art.created,
    }
    # 128 rows of the 256x64 fc1 weight pruned, out of all prunable weights of the preset.
    prunable = sum(p.numel() for p in digits_state[0].prunable_weights().values())
    assert ticket["sparsity"] == 8192 / prunable
    assert by_ref["base@main"]["parent"] == "base@init" and by_ref["base@init"]["top1"] is None


def test_ls_name_csv_and_table(store: Store, monkeypatch):
    result = cli(store.root, "ls", "base", "--format", "csv")
    assert result.exit_code == 0
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["ref"] for r in rows] == ["base@init", "base@main"]
    assert rows[1]["top1"] == "0.9" and rows[0]["size"] == str(store.resolve("base@init").size)

    from spkprune.cli import render

    monkeypatch.setattr(render.stdout, "width", 200)  # CliRunner is not a terminal: rich would use 80 columns
    table = cli(store.root, "ls")
    assert table.exit_code == 0 and "ticket@round-1" in table.stdout and "base@init" in table.stdout


def test_ls_of_a_missing_store_is_empty_and_creates_nothing(tmp_path: Path):
    result = cli(tmp_path / "nowhere", "ls", "--format", "json")
    assert result.exit_code == 0 and json.loads(result.stdout) == []
    assert not (tmp_path / "nowhere").exists()


# ------------------------------------------------------------------------------------------------- show
def test_show_json_has_metadata_lineage_metrics_and_tensors(store: Store):
    result = cli(store.root, "show", "ticket@round-1", "--format", "json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    art = store.resolve("ticket@round-1")
    assert doc["ref"] == "ticket@round-1" and doc["sha256"] == art.sha256 and doc["parent"] == "base"
    assert [row["ref"] for row in doc["lineage"]] == ["base@main", "base@init"]
    assert doc["metrics"] == {"top1": 0.8} and doc["meta"]["seed"] == 5 and doc["meta"]["arch"] == DIGITS
    tensors = {row["key"]: row for row in doc["tensors"]}
    fc1 = tensors["block.0.mlp.fc1_linear.weight"]
    assert (fc1["numel"], fc1["pruned"], fc1["sparsity"], fc1["shape"]) == (16384, 8192, 0.5, "256x64")
    assert fc1["zeros"] >= 8192
    assert tensors["head.weight"]["pruned"] is None
    assert not any(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in tensors)


def test_show_table_csv_and_a_file_reference(store: Store, tmp_path: Path, monkeypatch, digits_state):
    from spkprune.cli import render

    monkeypatch.setattr(render.stdout, "width", 200)
    table = cli(store.root, "show", "ticket@round-1")
    assert table.exit_code == 0, table.output
    assert "lineage" in table.stdout and "base@init" in table.stdout and "spikformer-2-64-digits" in table.stdout

    rows = list(csv.DictReader(io.StringIO(cli(store.root, "show", "ticket@round-1", "--format", "csv").stdout)))
    params = [name for name, _ in digits_state[0].named_parameters()]  # BatchNorm buffers are left out
    assert sorted(r["key"] for r in rows) == sorted(params)
    assert rows[0].keys() == {"key", "shape", "dtype", "numel", "zeros", "pruned", "sparsity"}

    copy = tmp_path / "ticket.safetensors"
    shutil.copyfile(store.resolve("ticket@round-1").path, copy)
    doc = json.loads(cli(store.root, "show", str(copy), "--format", "json").stdout)
    assert doc["kind"] == "file" and doc["ref"] == str(copy) and doc["parent"] == "base"


# ------------------------------------------------------------------------------------------- bad input
def test_bad_input_exits_2_with_one_line_and_leaves_the_store_unchanged(store: Store, tmp_path: Path):
    (tmp_path / "truncated.safetensors").write_bytes(store.resolve("base").path.read_bytes()[:1000])
    (tmp_path / "notes.safetensors").write_text("hello, not tensors")
    not_a_store = tmp_path / "project"
    not_a_store.mkdir()
    (not_a_store / "README").write_text("mine")
    before = snapshot(store.root)

    cases = [
        (store.root, ("show", "nosuch"), r"no artifact named 'nosuch' .*known names: base, ticket"),
        (store.root, ("show", "tickett@round-1"), r"did you mean 'ticket'"),
        (store.root, ("show", "base@round-7"), r"'base' has no tag 'round-7'.*its tags: init, main"),
        (store.root, ("ls", "nosuch"), r"no artifact named 'nosuch'"),
        (store.root, ("rm", "base@nope"), r"has no tag 'nope'"),
        (store.root, ("show", str(tmp_path / "truncated.safetensors")), r"truncated.safetensors is not a valid safetensors"),
        (store.root, ("show", str(tmp_path / "notes.safetensors")), r"notes.safetensors is not a valid safetensors"),
        (store.root, ("ls", "--format", "xml"), r"unknown --format 'xml'"),
        (not_a_store, ("ls",), r"project exists and is not a spkprune store"),
        (not_a_store, ("show", "base"), r"project exists and is not a spkprune store"),
    ]
    for root, args, pattern in cases:
        assert_user_error(cli(root, *args), pattern)
    assert snapshot(store.root) == before
    assert sorted(p.name for p in not_a_store.iterdir()) == ["README"]


def test_a_corrupt_index_row_is_named_and_the_rest_still_listed(store: Store):
    import sqlite3

    con = sqlite3.connect(store.index_path)
    con.execute("UPDATE artifacts SET meta = '{truncated' WHERE name = 'base' AND tag = 'main'")
    con.commit()
    con.close()
    before = snapshot(store.root)

    for fmt in ("json", "csv", "table"):
        listing = cli(store.root, "ls", "--format", fmt)
        assert listing.exit_code == 0, listing.output
        warning = listing.stderr.strip().splitlines()
        assert len(warning) == 1 and warning[0].startswith("warning: artifact base@main has a corrupt index row in ")
        assert "spkprune rm base@main" in warning[0] and "left out of this listing" in warning[0]
        assert "base@init" in listing.stdout and "ticket@round-1" in listing.stdout
        assert "base@main" not in listing.stdout and "Traceback" not in listing.output
    refs = [row["ref"] for row in json.loads(cli(store.root, "ls", "--format", "json").stdout)]
    assert refs == ["base@init", "ticket@round-1"]
    assert cli(store.root, "ls", "base", "--format", "json").stderr.count("warning:") == 1

    assert_user_error(cli(store.root, "show", "base"), r"^error: artifact base@main has a corrupt index row in .*"
                                                       r"its metadata is not JSON .*\(spkprune rm base@main\)")
    child = cli(store.root, "show", "ticket@round-1", "--format", "json")  # its parent is the corrupt row
    assert child.exit_code == 0 and json.loads(child.stdout)["lineage"] == [{"ref": "base@main",
                                                                             "kind": "corrupt index row"}]
    assert child.stderr.startswith("warning: the lineage of ticket@round-1 is cut short: artifact base@main has")
    assert len(child.stderr.strip().splitlines()) == 1
    assert snapshot(store.root) == before
    removed = cli(store.root, "rm", "base@main")
    assert removed.exit_code == 0 and "removed base@main" in removed.stderr
    assert cli(store.root, "ls", "--format", "json").stderr == ""


def test_corrupt_blob_is_reported_by_the_real_cli(store: Store):
    art = store.resolve("base@main")
    data = bytearray(art.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    art.path.write_bytes(bytes(data))
    before = snapshot(store.root)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "spkprune", "--store", str(store.root), "show", "base", "--format", "json"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert re.fullmatch(r"error: artifact base@main is corrupt: sha256 mismatch \(index [0-9a-f]{16}\.\.\., "
                        r"file [0-9a-f]{16}\.\.\., \d+ of \d+ bytes\) in .*\n", proc.stderr), proc.stderr
    assert snapshot(store.root) == before


def test_rm_removes_one_tag(store: Store):
    blob = store.resolve("base@init").path
    result = cli(store.root, "rm", "base@init")
    assert result.exit_code == 0 and "removed base@init" in result.stderr
    assert [a.ref for a in store.list()] == ["base@main", "ticket@round-1"]
    assert not blob.exists()
    assert store.lineage(store.resolve("base@main")) == ([], "base@init")

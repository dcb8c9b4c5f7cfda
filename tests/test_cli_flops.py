"""`spkprune flops report`: formats, what-ifs, data, checkpoints from the store, and one-line errors (exit 2)."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import spkprune
from spkprune.checkpoint import Checkpoint, save_checkpoint
from spkprune.cli import app
from spkprune.cli import render
from spkprune.store import Store

DIGITS = "spikformer-2-64-digits"


def invoke(store_root, *args):
    return CliRunner().invoke(app, ["--store", str(store_root), "flops", "report", *args])


def one_line_error(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture()
def ticket_store(tmp_path):
    """A store holding a digits model with half of every prunable weight masked to zero."""
    torch.manual_seed(0)
    model = spkprune.create_model(DIGITS)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    masks = {}
    for key in model.prunable_weights():
        mask = torch.rand(state[key].shape) >= 0.5
        state[key] = state[key] * mask
        masks[key] = mask
    store = Store.open(tmp_path / "store")
    meta = {"arch": DIGITS, "config": model.config.to_dict(), "selector": None}
    save_checkpoint(store, "ticket", "main", Checkpoint(state, masks, meta))
    return tmp_path / "store", masks


def test_json_report_of_a_preset(tmp_path):
    result = invoke(tmp_path / "none", DIGITS, "--format", "json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)  # one JSON document, nothing else on stdout
    model_report = spkprune.counting.count_operations(spkprune.create_model(DIGITS))
    assert doc["totals"] == model_report["totals"]
    assert [r["layer"] for r in doc["rows"]] == [r["layer"] for r in model_report["rows"]]
    assert doc["params_used"] == 163_906 and doc["timesteps"] == 4 and doc["tokens_per_block"] == [16, 16]
    assert doc["source"] == {"ref": DIGITS, "kind": "preset"}
    assert doc["e_mac"] == 4.6 and doc["e_ac"] == 0.9 and doc["dataset"] is None
    assert "SOPs and energy need data" in doc["notes"][0]
    first = doc["rows"][0]
    assert set(first) >= {"layer", "kind", "block", "tokens", "dense_macs", "nonzero_macs", "sops", "energy_pj"}


def test_keep_whatif_by_block_csv(tmp_path):
    result = invoke(tmp_path, DIGITS, "--keep", "0.5", "--by", "block", "--format", "csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["block"] for r in rows] == ["sps", "block.0", "block.1", "head"]
    assert [r["tokens"] for r in rows[1:3]] == ["16", "8"]
    assert int(rows[1]["dense_macs"]) > 2 * int(rows[2]["dense_macs"])  # attention shrinks 4x, the rest 2x


def test_table_with_data_and_energy_constants(tmp_path, monkeypatch):
    monkeypatch.setattr(render.stdout, "width", 200)
    args = (DIGITS, "--dataset", "digits", "--batches", "1", "--batch-size", "4")
    result = invoke(tmp_path, *args, "--e-mac", "3.1", "--e-ac", "0.1")
    assert result.exit_code == 0, result.output
    assert "block.1.mlp.fc2_linear" in result.stdout and "energy" in result.stdout
    assert "E_MAC 3.1 pJ, E_AC 0.1 pJ" in result.stdout and "measured on: 4 images of digits" in result.stdout
    doc = json.loads(invoke(tmp_path, *args, "--e-mac", "3.1", "--e-ac", "0.1", "--format", "json").stdout)
    totals = doc["totals"]
    assert totals["energy_pj"] == pytest.approx(3.1 * totals["macs"] + 0.1 * totals["sops"])
    assert doc["images"] == 4 and doc["batches"] == 1 and doc["dataset"] == "digits"


def test_report_of_a_store_checkpoint(ticket_store):
    root, masks = ticket_store
    result = invoke(root, "ticket", "--format", "json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["source"] == {"ref": "ticket", "kind": "checkpoint"}
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert doc["params_nonzero"] == doc["params_used"] - pruned
    for row in doc["rows"]:
        if row["kind"] != "attn":
            mask = masks[row["layer"] + ".weight"]
            assert row["weight_sparsity"] == pytest.approx(1 - int(mask.sum()) / mask.numel(), abs=1e-6)
    assert doc["totals"]["nonzero_macs"] < 0.6 * doc["totals"]["dense_macs"]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["spikformer-9-999-cifar10"], "neither a preset"),
        (["spikformer-2-64-digitz"], "did you mean spikformer-2-64-digits"),
        ([DIGITS, "--keep", "0"], "(0, 1]"),
        ([DIGITS, "--keep", "1.5"], "(0, 1]"),
        ([DIGITS, "--keep", "0.9,abc"], "comma-separated"),
        ([DIGITS, "--keep", "0.5", "--dataset", "digits"], "what-if"),
        ([DIGITS, "--format", "xml"], "--format"),
        ([DIGITS, "--by", "stage"], "--by"),
        ([DIGITS, "--save"], "not one"),
        (["spikformer-4-384-cifar10", "--dataset", "digits"], "does not fit"),
        ([DIGITS, "--dataset", "cifar10-dvs"], "does not fit"),
        ([DIGITS, "--dataset", "mnist"], "unknown dataset"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, args, needle):
    assert needle in one_line_error(invoke(tmp_path, *args))


def test_unknown_ref_in_a_store(ticket_store):
    line = one_line_error(invoke(ticket_store[0], "tickt"))
    assert "neither a preset" in line and "did you mean 'ticket'" in line


@pytest.mark.slow  # a fresh interpreter imports torch: tens of seconds on a busy machine
def test_cli_subprocess_exit_code(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "spkprune", "--store", str(tmp_path), "flops", "report", DIGITS, "--keep", "2"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == ["error: --keep: each keep ratio must lie in (0, 1], e.g. 0.7 or 0.9,0.7,0.5 (got '2')"]

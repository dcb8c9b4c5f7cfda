"""`spkprune import`: original Spikformer checkpoints in every layout, and everything that must be refused."""

from __future__ import annotations

import argparse
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from spkprune.checkpoint import import_checkpoint, load_checkpoint, read_original_checkpoint
from spkprune.cli import app
from spkprune.errors import SpkpruneError
from spkprune.store import Store

DIGITS = "spikformer-2-64-digits"


class NotWeights:
    """Any pickled object other than tensors and plain containers must be refused."""


class Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def original_state():
    from spkprune.models import create_model

    torch.manual_seed(3)
    model = create_model(DIGITS)
    with torch.no_grad():  # non-default running stats, so a mix-up of buffers would show
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_()
    return {k: v.clone() for k, v in model.state_dict().items()}


def timm_style(state: dict) -> dict:
    """What timm's CheckpointSaver writes (here from a DDP run: every key starts with `module.`)."""
    return {
        "epoch": 299,
        "arch": "spikformer",
        "state_dict": {f"module.{k}": v for k, v in state.items()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "weight_decay": 0.06, "params": [0, 1]}]},
        "version": 2,
        "args": argparse.Namespace(model="spikformer", lr=5e-4, epochs=300, amp=True),
        "metric": 95.19,
    }


def dvs_style(state: dict) -> dict:
    """What the original DVS training script writes."""
    return {
        "model": state,
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
        "lr_scheduler": {"T_max": 106, "last_epoch": 105},
        "epoch": 105,
        "args": argparse.Namespace(T=16, lr=1e-3),
        "max_test_acc": 0.805,
    }


def assert_same(a: dict, b: dict) -> None:
    assert list(sorted(a)) == list(sorted(b))
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(
    "filename, build, entry",
    [
        ("checkpoint-299.pth.tar", timm_style, "state_dict"),
        ("checkpoint_max_test_acc.pth", dvs_style, "model"),
        ("bare.pth", lambda s: dict(s), None),
    ],
)
def test_pickled_layouts_import_bit_exact(tmp_path: Path, original_state, filename, build, entry):
    path = tmp_path / filename
    torch.save(build(original_state), path)
    store = Store.open(tmp_path / "store")
    art = import_checkpoint(path, DIGITS, store, "orig")
    assert art.ref == "orig@main" and art.parent is None
    source = art.meta["source"]
    assert source["format"] == "pth" and source["entry"] == entry and source["path"] == str(path.resolve())
    assert art.meta["arch"] == DIGITS and art.meta["config"]["embed_dim"] == 64
    assert art.meta["sparsity"]["prunable"] == 0.0
    assert_same(load_checkpoint("orig", store).state_dict, original_state)


def test_safetensors_import_and_epoch_recorded(tmp_path: Path, original_state):
    path = tmp_path / "weights.safetensors"
    save_file(original_state, str(path))
    store = Store.open(tmp_path / "store")
    art = import_checkpoint(path, DIGITS, store, "st", tag="v1")
    assert art.meta["source"]["format"] == "safetensors"
    assert_same(load_checkpoint("st@v1", store).state_dict, original_state)

    torch.save(timm_style(original_state), tmp_path / "t.pth.tar")
    assert read_original_checkpoint(tmp_path / "t.pth.tar")[1]["epoch"] == 299


def test_ddp_prefix_is_only_stripped_when_every_key_has_it(tmp_path: Path, original_state):
    mixed = {("module." + k if k.startswith("head") else k): v for k, v in original_state.items()}
    torch.save(mixed, tmp_path / "mixed.pth")
    with pytest.raises(SpkpruneError, match=r"2 missing keys: head.weight, head.bias; 2 unexpected keys: module.head.weight, module.head.bias$"):
        import_checkpoint(tmp_path / "mixed.pth", DIGITS, Store.open(tmp_path / "store"), "m")


def test_existing_name_needs_overwrite(tmp_path: Path, original_state):
    torch.save(original_state, tmp_path / "a.pth")
    store = Store.open(tmp_path / "store")
    first = import_checkpoint(tmp_path / "a.pth", DIGITS, store, "x")
    with pytest.raises(SpkpruneError, match="x@main already exists"):
        import_checkpoint(tmp_path / "a.pth", DIGITS, store, "x")
    changed = dict(original_state, **{"head.bias": torch.ones(10)})
    torch.save(changed, tmp_path / "b.pth")
    second = import_checkpoint(tmp_path / "b.pth", DIGITS, store, "x", replace=True)
    assert second.sha256 != first.sha256
    assert torch.equal(load_checkpoint("x", store).state_dict["head.bias"], torch.ones(10))


# ------------------------------------------------------------------------------------ refused, via the CLI
def cli_import(tmp_path: Path, path: Path, *extra: str):
    runner = CliRunner()
    return runner.invoke(
        app, ["--store", str(tmp_path / "store"), "import", str(path), "--arch", DIGITS, "--name", "bad", *extra]
    )


def assert_refused(result, pattern: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    import re

    assert re.search(pattern, lines[0]), lines[0]


def test_refusals_exit_2_with_one_line_and_leave_no_store(tmp_path: Path, original_state):
    cases = []
    torch.save({"state_dict": NotWeights()}, tmp_path / "object.pth")
    cases.append(("object.pth", r"object.pth is not a plain tensor dictionary: it pickles GLOBAL .*NotWeights"))
    marker = tmp_path / "pwned"
    torch.save({"state_dict": Exploit(marker)}, tmp_path / "exploit.pth")
    cases.append(("exploit.pth", r"it pickles GLOBAL (posix|os)\.system, which spkprune refuses"))
    torch.save({"state_dict": {"w": [1, 2, 3]}, "epoch": 1}, tmp_path / "lists.pth")
    cases.append(("lists.pth", r"lists.pth\['state_dict'\] is not a plain tensor dictionary \(non-tensor entries: w\)"))
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    cases.append(("list.pth", r"list.pth holds a list, not a dictionary of tensors"))
    torch.save({"weights": {"a": torch.zeros(1)}, "epoch": 3}, tmp_path / "nokey.pth")
    cases.append(("nokey.pth", r"nokey.pth has no state_dict: .*found keys: weights, epoch"))
    wrong = dict(original_state, **{"head.weight": torch.zeros(11, 64), "head.bias": torch.zeros(11)})
    torch.save(timm_style(wrong), tmp_path / "shapes.pth.tar")
    cases.append(("shapes.pth.tar", r"does not fit spikformer-2-64-digits: 2 mismatched shapes: "
                                    r"head.weight expected \[10, 64\] received \[11, 64\]"))
    torch.save(original_state, tmp_path / "full.pth")
    (tmp_path / "truncated.pth").write_bytes((tmp_path / "full.pth").read_bytes()[:5000])
    cases.append(("truncated.pth", r"truncated.pth is not a readable PyTorch checkpoint"))
    (tmp_path / "notes.pth").write_text("not a checkpoint at all")
    cases.append(("notes.pth", r"notes.pth is not a readable PyTorch checkpoint"))
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    cases.append(("cut.safetensors", r"cut.safetensors is not a valid safetensors file"))
    cases.append(("missing.pth", r"missing.pth does not exist"))

    for filename, pattern in cases:
        assert_refused(cli_import(tmp_path, tmp_path / filename), pattern)
        assert not (tmp_path / "store").exists(), f"{filename}: a refused import must not create a store"
    assert not marker.exists(), "the pickled os.system call must never run"


def test_other_pickle_protocols_are_refused_without_torch_warnings(tmp_path: Path, original_state):
    torch.save(original_state, tmp_path / "protocol4.pth", pickle_protocol=4)
    with open(tmp_path / "raw.pth", "wb") as handle:
        pickle.dump({"state_dict": {"w": 1}}, handle, protocol=5)
    for name in ("protocol4.pth", "raw.pth"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(SpkpruneError, match=rf"{name} is not a readable PyTorch checkpoint"):
                read_original_checkpoint(tmp_path / name)
        assert [str(w.message) for w in caught] == []  # torch's "Detected pickle protocol" lines stay silent
        assert_refused(cli_import(tmp_path, tmp_path / name), rf"{name} is not a readable PyTorch checkpoint")


def test_unknown_preset_and_existing_name_via_cli(tmp_path: Path, original_state):
    torch.save(original_state, tmp_path / "w.pth")
    runner = CliRunner()
    result = runner.invoke(app, ["--store", str(tmp_path / "store"), "import", str(tmp_path / "w.pth"),
                                 "--arch", "spikformer-9-9-nope", "--name", "w"])
    assert_refused(result, r"unknown preset 'spikformer-9-9-nope'")

    ok = cli_import(tmp_path, tmp_path / "w.pth")
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.strip() == "bad@main"
    store = Store.open(tmp_path / "store")
    before = [(a.ref, a.sha256, a.created) for a in store.list()]
    assert_refused(cli_import(tmp_path, tmp_path / "w.pth"), r"bad@main already exists")
    assert [(a.ref, a.sha256, a.created) for a in store.list()] == before
    assert cli_import(tmp_path, tmp_path / "w.pth", "--overwrite").exit_code == 0


def test_load_original_gives_a_state_dict_that_loads_strictly(tmp_path):
    import spkprune

    model = spkprune.create_model("spikformer-2-64-digits")
    path = tmp_path / "model_best.pth.tar"
    torch.save({"state_dict": model.state_dict(), "epoch": 3, "arch": "spikformer"}, path)
    fresh = spkprune.create_model("spikformer-2-64-digits")
    fresh.load_state_dict(spkprune.load_original(path), strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)

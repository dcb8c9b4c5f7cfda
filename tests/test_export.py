"""Export formats: dense and sparse round trips (bit-exact), corrupt files, sizes, the model card, the CLI."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.numpy import load_file as load_numpy, save_file as save_numpy
from safetensors.torch import load_file
from typer.testing import CliRunner

from spkprune.checkpoint import Checkpoint, build_model, folder, load_checkpoint, save_checkpoint
from spkprune.checkpoint.folder import LossyWeightsWarning, read_folder, read_sparse, write_dense, write_sparse
from spkprune.cli import app
from spkprune.errors import SpkpruneError
from spkprune.export.card import model_card
from spkprune.export.exporter import export_checkpoint
from spkprune.models import create_model
from spkprune.store import Store

PRESET = "spikformer-2-64-digits"
TRAINED_ZERO_KEY = "block.0.attn.q_linear.weight"


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, so equality means bit-identical (it tells -0.0 from +0.0)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def make_ticket(sparsity: float = 0.9, seed: int = 0) -> Checkpoint:
    """A digits Spikformer with a global-magnitude mask, trained-looking BatchNorm statistics, and one weight
    that is exactly zero but kept (a zero produced by training, not by pruning)."""
    torch.manual_seed(seed)
    model = create_model(PRESET)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    prunable = list(model.prunable_weights())
    gen = torch.Generator().manual_seed(seed + 1)
    for key, value in state.items():
        if value.is_floating_point() and key not in prunable:
            value.copy_(torch.rand(value.shape, generator=gen) + 0.5)  # no init constants for zlib to exploit
    magnitudes = torch.cat([state[k].abs().reshape(-1) for k in prunable])
    threshold = magnitudes.kthvalue(int(sparsity * magnitudes.numel())).values
    masks = {k: state[k].abs() > threshold for k in prunable}
    for key in prunable:
        state[key] = state[key] * masks[key]  # leaves -0.0 where a negative weight was pruned
    kept = masks[TRAINED_ZERO_KEY].nonzero()[0].tolist()
    state[TRAINED_ZERO_KEY][tuple(kept)] = 0.0
    meta = {
        "arch": PRESET,
        "config": model.config.to_dict(),
        "selector": None,
        "metrics": {"top1": 0.875, "top5": 0.99},
        "sparsity": {"prunable": 1 - sum(int(m.sum()) for m in masks.values()) / magnitudes.numel()},
        "train": {"dataset": "digits", "epochs": 3},
        "recipe": {"stages": [{"imp": {"rounds": 3, "target": 0.9}}]},
    }
    return Checkpoint(state, masks, meta, None)


def expected_weights(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """What an export must give back: the weights with pruned positions as +0.0."""
    return {k: v.masked_fill(~ckpt.masks[k], 0.0) if k in ckpt.masks else v for k, v in ckpt.state_dict.items()}


def assert_same_checkpoint(state, masks, ckpt: Checkpoint) -> None:
    expected = expected_weights(ckpt)
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert state[key].dtype == value.dtype and state[key].shape == value.shape, key
        assert torch.equal(bits(state[key]), bits(value)), key
    assert set(masks) == set(ckpt.masks)
    for key, mask in ckpt.masks.items():
        assert masks[key].dtype == torch.bool and torch.equal(masks[key], mask), key


@pytest.fixture(scope="module")
def ticket() -> Checkpoint:
    torch.set_num_threads(1)
    return make_ticket()


# ------------------------------------------------------------------------------------------ round trips


def test_ticket_has_a_kept_zero_and_negative_zeros(ticket):
    weight, mask = ticket.state_dict[TRAINED_ZERO_KEY], ticket.masks[TRAINED_ZERO_KEY]
    assert bool(((weight == 0) & mask).any()), "the fixture must contain a zero that training produced"
    assert bool(torch.signbit(weight[~mask]).any()), "the fixture must contain -0.0 at pruned positions"


def test_sparse_round_trip_is_bit_exact(tmp_path, ticket):
    path = write_sparse(tmp_path / folder.SPARSE_FILE, ticket.state_dict, ticket.masks, ticket.meta)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LossyWeightsWarning)
        state, masks, meta = read_sparse(path)
    assert_same_checkpoint(state, masks, ticket)
    kept_zero = (state[TRAINED_ZERO_KEY] == 0) & masks[TRAINED_ZERO_KEY]
    assert int(kept_zero.sum()) >= 1  # still "kept", not folded into the pruned positions
    assert meta["metrics"] == ticket.meta["metrics"] and meta["recipe"] == ticket.meta["recipe"]


def test_sparse_metadata_fields(tmp_path, ticket):
    path = write_sparse(tmp_path / folder.SPARSE_FILE, ticket.state_dict, ticket.masks, ticket.meta)
    with safe_open(str(path), "np") as handle:
        md = handle.metadata()
    assert md["format"] == "spkprune.sparse" and md["format_version"] == "1"
    assert md["value_dtype"] == "float32" and md["lossy"] == "false" and md["bitorder"] == "little"
    assert json.loads(md["config"])["arch"] == PRESET
    assert json.loads(md["sparsity"]) == ticket.meta["sparsity"]
    assert json.loads(md["metrics"]) == ticket.meta["metrics"]
    assert json.loads(md["recipe"]) == ticket.meta["recipe"]
    assert md["mask_sha256"] == folder.mask_sha256(ticket.masks)
    encodings = {row[3] for row in _table(md)}
    assert encodings <= {"dense", "bitmask", "csr"} and "bitmask" in encodings


def test_csr_chosen_where_smaller_and_round_trips(tmp_path):
    # one very sparse wide tensor (CSR wins), one dense-ish tensor (bitmask wins), one unpruned
    gen = torch.Generator().manual_seed(3)
    wide = torch.randn(4, 1000, generator=gen)
    wide_mask = torch.zeros(4, 1000, dtype=torch.bool)
    wide_mask[0, 5] = wide_mask[2, 999] = wide_mask[3, 0] = True
    half = torch.randn(8, 8, generator=gen)
    half_mask = half > 0
    state = {"wide": wide * wide_mask, "half": half * half_mask, "bias": torch.randn(8, generator=gen),
             "count": torch.tensor(7)}
    masks = {"wide": wide_mask, "half": half_mask}
    ckpt = Checkpoint(state, masks, {"arch": None})
    path = write_sparse(tmp_path / "x.safetensors", state, masks, {})
    with safe_open(str(path), "np") as handle:
        encodings = {row[0]: row[3] for row in _table(handle.metadata())}
        col_dtype = handle.metadata()
    assert encodings == {"wide": "csr", "half": "bitmask", "bias": "dense", "count": "dense"}
    assert json.loads(col_dtype["sections"])["csr_col"]["dtype"] == "uint16"  # columns up to 999
    got, got_masks, _ = read_sparse(path)
    assert_same_checkpoint(got, got_masks, ckpt)
    assert got["count"].shape == () and int(got["count"]) == 7


def test_dense_round_trip_is_bit_exact_and_loads_strictly(tmp_path, ticket):
    folder.write_weights(tmp_path, ticket.state_dict, ticket.masks, ticket.meta, "dense")
    raw = load_file(str(tmp_path / folder.DENSE_FILE))
    assert set(raw) == set(ticket.state_dict)  # exactly the original keys, nothing added
    model = create_model(PRESET)
    model.load_state_dict(raw, strict=True)
    ckpt = read_folder(tmp_path)
    assert_same_checkpoint(ckpt.state_dict, ckpt.masks, ticket)
    assert ckpt.meta["arch"] == PRESET and ckpt.meta["export"] == {"format": "dense", "dtype": "float32", "lossy": False}
    assert json.loads((tmp_path / "config.json").read_text())["masks_file"] == folder.MASKS_FILE


def test_float16_is_lossy_and_labelled(tmp_path, ticket):
    path = write_sparse(tmp_path / folder.SPARSE_FILE, ticket.state_dict, ticket.masks, ticket.meta, "float16")
    with pytest.warns(LossyWeightsWarning, match="float16-rounded"):
        state, masks, _ = read_sparse(path)
    expected = expected_weights(ticket)
    for key, value in expected.items():
        want = value.half().float() if value.is_floating_point() else value
        assert state[key].dtype == value.dtype and torch.equal(bits(state[key]), bits(want)), key
    assert all(torch.equal(masks[k], m) for k, m in ticket.masks.items())
    with safe_open(str(path), "np") as handle:
        assert handle.metadata()["lossy"] == "true" and handle.metadata()["value_dtype"] == "float16"


def test_float16_refuses_values_out_of_range(tmp_path):
    state = {"w": torch.tensor([1.0, 1e6])}
    with pytest.raises(SpkpruneError, match="beyond the float16 range"):
        write_sparse(tmp_path / "x.safetensors", state, {}, {}, "float16")


def test_nonzero_pruned_weight_is_refused(tmp_path):
    state = {"w": torch.tensor([[1.0, 2.0]])}
    masks = {"w": torch.tensor([[True, False]])}
    with pytest.raises(SpkpruneError, match="nonzero where its mask prunes it"):
        write_sparse(tmp_path / "x.safetensors", state, masks, {})


def test_build_model_from_exported_folder(tmp_path, ticket):
    folder.write_weights(tmp_path, ticket.state_dict, ticket.masks, ticket.meta, "sparse")
    model = build_model(load_checkpoint(str(tmp_path)))
    loaded = model.state_dict()
    for key, value in expected_weights(ticket).items():
        assert torch.equal(loaded[key], value), key


# ------------------------------------------------------------------------------------------ corrupt files


def _table(md: dict) -> list:
    import base64
    import zlib

    return json.loads(zlib.decompress(base64.b64decode(md["tensors"])))


def _rewrite(path, change) -> None:
    """Decode every section, let `change(sections, metadata)` edit them, write them back raw."""
    with safe_open(str(path), "np") as handle:
        metadata = dict(handle.metadata())
    stored = load_numpy(str(path))
    entries = json.loads(metadata["sections"])
    from spkprune.checkpoint.sparse import decode_section

    sections = {name: decode_section(path, name, entries[name], stored[name]).copy() for name in entries}
    change(sections, metadata)
    metadata["sections"] = json.dumps(
        {name: {"dtype": a.dtype.name, "count": int(a.size), "codec": "raw"} for name, a in sections.items()}
    )
    save_numpy(sections, str(path), metadata=metadata)


@pytest.fixture()
def sparse_file(tmp_path, ticket):
    return write_sparse(tmp_path / folder.SPARSE_FILE, ticket.state_dict, ticket.masks, ticket.meta)


def test_rewritten_file_still_reads(sparse_file, ticket):
    _rewrite(sparse_file, lambda sections, md: None)  # the helper itself keeps files valid
    state, masks, _ = read_sparse(sparse_file)
    assert_same_checkpoint(state, masks, ticket)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s, md: s.__setitem__("bitmask", s["bitmask"][:-1]), "section 'bitmask' ends before"),
        (lambda s, md: s.__setitem__("bitmask", np.append(s["bitmask"], np.uint8(0))), "section 'bitmask' holds"),
        (lambda s, md: s.__setitem__("values", s["values"][:-1]), "section 'values' ends before"),
        (lambda s, md: s.__setitem__("values", np.append(s["values"], np.float32(1))), "a mask and its values disagree"),
        (lambda s, md: s["bitmask"].__setitem__(0, s["bitmask"][0] ^ 1), "ends before|disagree|mask_sha256"),
        (lambda s, md: md.__setitem__("format_version", "9"), "upgrade spkprune"),
        (lambda s, md: md.__setitem__("tensors", "not base64!"), "tensor table does not decode"),
    ],
    ids=["short-bitmask", "long-bitmask", "missing-value", "extra-value", "flipped-bit", "version", "table"],
)
def test_corrupt_sparse_file_is_refused(sparse_file, change, message):
    _rewrite(sparse_file, change)
    with pytest.raises(SpkpruneError, match=message) as info:
        read_sparse(sparse_file)
    assert "\n" not in str(info.value)


def test_bad_csr_indices_are_refused(tmp_path):
    state = {"w": torch.zeros(2, 600)}
    mask = torch.zeros(2, 600, dtype=torch.bool)
    mask[0, 3] = mask[1, 7] = True
    path = write_sparse(tmp_path / "x.safetensors", state, {"w": mask}, {})

    def out_of_range(sections, md):
        sections["csr_col"] = np.array([3, 600], dtype=np.uint16)

    _rewrite(path, out_of_range)
    with pytest.raises(SpkpruneError, match="CSR column indices of 'w' are out of range"):
        read_sparse(path)


def test_truncated_file_is_refused(sparse_file):
    data = sparse_file.read_bytes()
    sparse_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(SpkpruneError, match="not a valid spkprune export"):
        read_sparse(sparse_file)


def test_corrupt_masks_file_is_refused(tmp_path, ticket):
    folder.write_weights(tmp_path, ticket.state_dict, ticket.masks, ticket.meta, "dense")
    path = tmp_path / folder.MASKS_FILE
    with safe_open(str(path), "np") as handle:
        metadata = dict(handle.metadata())
    packed = load_numpy(str(path))
    packed[TRAINED_ZERO_KEY] = packed[TRAINED_ZERO_KEY][:-1]
    save_numpy(packed, str(path), metadata=metadata)
    with pytest.raises(SpkpruneError, match="mask 'block.0.attn.q_linear.weight' has"):
        read_folder(tmp_path)


# ------------------------------------------------------------------------------------------ sizes


def test_size_targets_for_a_90_percent_digits_ticket(tmp_path, ticket):
    assert ticket.meta["sparsity"]["prunable"] == pytest.approx(0.9, abs=1e-4)
    dense = write_dense(tmp_path / "dense.safetensors", ticket.state_dict, ticket.masks, ticket.meta)
    sparse32 = write_sparse(tmp_path / "s32.safetensors", ticket.state_dict, ticket.masks, ticket.meta)
    sparse16 = write_sparse(tmp_path / "s16.safetensors", ticket.state_dict, ticket.masks, ticket.meta, "float16")
    dense_size = dense.stat().st_size
    assert dense_size > 4 * 160_000  # the dense float32 file really holds all 167k parameters
    assert sparse32.stat().st_size <= 0.15 * dense_size
    assert sparse16.stat().st_size <= 0.08 * dense_size


# ------------------------------------------------------------------------------------------ model card


def test_model_card_front_matter_parses(ticket):
    lineage = [{"ref": "t@main", "meta": {"sparsity": {"prunable": 0.0}, "metrics": {"top1": 0.9}}},
               {"ref": "t@round-1", "meta": ticket.meta}]
    flops = {"rows": [{"layer": "patch_embed.proj_conv", "sops": 812.5, "dense_macs": 5184}],
             "totals": {"macs": 5184, "sops": 812.5, "energy_mj": 0.001}}
    meta = {**ticket.meta, "flops": flops, "selector": {"keep": 0.7, "locations": [1]}}
    card = model_card(meta, name="digits-ticket", fmt="sparse", dtype="float32", has_masks=True, lineage=lineage,
                      hub_ref="hf://org/digits-ticket@round-1")
    assert card.startswith("---\n")
    header = yaml.safe_load(card.split("---\n")[1])
    assert header["library_name"] == "spkprune"
    assert header["tags"] == ["spiking-neural-network", "spikformer", "lottery-ticket", "sparse", "token-pruning"]
    assert header["datasets"] == ["digits"]
    result = header["model-index"][0]["results"][0]
    assert result["metrics"][0] == {"type": "accuracy", "value": 0.875, "name": "Top-1 accuracy"}
    assert "| t@round-1 | 90.0% | 87.5% |" in card
    assert "| patch_embed.proj_conv | 5184 | 812.5 |" in card
    assert 'load_checkpoint("hf://org/digits-ticket@round-1")' in card


def test_dense_card_has_no_ticket_tags():
    card = model_card({"arch": PRESET}, name="dense", fmt="dense", dtype="float32", has_masks=False)
    header = yaml.safe_load(card.split("---\n")[1])
    assert header["tags"] == ["spiking-neural-network", "spikformer"] and "model-index" not in header


# ------------------------------------------------------------------------------------------ export + CLI


@pytest.fixture()
def store(tmp_path, ticket):
    st = Store.open(tmp_path / "store", create=True)
    dense_meta = {**ticket.meta, "sparsity": {"prunable": 0.0}, "metrics": {"top1": 0.9}}
    save_checkpoint(st, "t", "main", Checkpoint(ticket.state_dict, {}, dense_meta))
    save_checkpoint(st, "t", "round-1", ticket, parent="t@main")
    return st


def test_export_writes_a_complete_folder_with_lineage(tmp_path, store, ticket):
    result = export_checkpoint("t@round-1", tmp_path / "out", store=store, fmt="sparse")
    assert [name for name, _ in result.files] == ["README.md", "config.json", folder.SPARSE_FILE]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| t@main | 0.0% | 90.0% |" in card and "| t@round-1 | 90.0% | 87.5% |" in card
    ckpt = load_checkpoint(str(tmp_path / "out"))
    assert_same_checkpoint(ckpt.state_dict, ckpt.masks, ticket)
    assert result.ratio is not None and result.ratio < 0.15


def test_cli_export_refuses_non_empty_out_and_replaces_with_overwrite(tmp_path, store):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    runner = CliRunner()
    args = ["--store", str(store.root), "export", "t@round-1", "--out", str(out)]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2
    assert refused.stderr.strip() == f"error: --out {out} exists and is not empty; choose another folder or pass --overwrite"
    assert (out / "keep.txt").read_text() == "mine"
    done = runner.invoke(app, args + ["--overwrite", "--format", "sparse", "--dtype", "float16"])
    assert done.exit_code == 0, done.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", folder.SPARSE_FILE]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temp folders left behind
    assert "float16 is lossy" in done.stdout


def test_cli_export_unknown_ref_is_one_line(tmp_path, store):
    result = CliRunner().invoke(app, ["--store", str(store.root), "export", "t@round-7", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: 't' has no tag 'round-7' in store {store.root}; its tags: main, round-1"
    ]
    assert not (tmp_path / "o").exists()


def test_cli_push_options_need_push_to_hub(tmp_path, store):
    result = CliRunner().invoke(
        app, ["--store", str(store.root), "export", "t", "--out", str(tmp_path / "o"), "--dry-run"]
    )
    assert result.exit_code == 2 and "only apply to a push" in result.stderr



# ------------------------------------------------------------------------------------------ reliability


def _cli_error(result) -> str:
    """The one stderr line of a refused CLI command (exit code 2, no traceback)."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize("fmt", ["sparse", "dense"])
def test_exporting_twice_gives_the_same_bytes(tmp_path, store, fmt):
    # The store hands tensors back in hash-map order and safetensors writes metadata in hash-map order:
    # three exports make an accidental match of either order unlikely.
    exports = []
    for run in range(3):
        out = tmp_path / f"out-{run}"
        export_checkpoint("t@round-1", out, store=store, fmt=fmt)
        exports.append({path.name: path.read_bytes() for path in sorted(out.iterdir())})
    assert exports[0] == exports[1] == exports[2]
    weights = folder.SPARSE_FILE if fmt == "sparse" else folder.DENSE_FILE
    assert weights in exports[0]
    assert_same_checkpoint(*_state_and_masks(tmp_path / "out-0"), make_ticket())


def _state_and_masks(path):
    ckpt = load_checkpoint(str(path))
    return ckpt.state_dict, ckpt.masks


def test_sparse_table_follows_the_model_state_dict_order(tmp_path, store):
    export_checkpoint("t@round-1", tmp_path / "out", store=store, fmt="sparse")
    with safe_open(str(tmp_path / "out" / folder.SPARSE_FILE), "np") as handle:
        keys = [row[0] for row in _table(handle.metadata())]
    assert keys == list(create_model(PRESET).state_dict())


@pytest.mark.parametrize("version", ["99", "2", None])
def test_unknown_export_format_version_is_refused(tmp_path, ticket, version):
    out = tmp_path / "export"
    out.mkdir()
    folder.write_weights(out, ticket.state_dict, ticket.masks, ticket.meta, "sparse")
    config = json.loads((out / "config.json").read_text())
    config["format_version"] = version
    (out / "config.json").write_text(json.dumps(config))
    message = (f"{out / 'config.json'} has export format version {version!r}; this spkprune reads version 1: "
               "upgrade spkprune")
    with pytest.raises(SpkpruneError) as info:
        load_checkpoint(str(out))
    assert str(info.value) == message
    result = CliRunner().invoke(app, ["--store", str(tmp_path / "store"), "show", str(out)])
    assert _cli_error(result) == f"error: {message}"


def test_export_removes_temp_folders_that_killed_exports_left(tmp_path, store):
    import os
    import subprocess
    import time

    finished = subprocess.Popen(["true"])
    finished.wait()  # a process that is gone: what a killed export's PID names
    past = time.time() - 3600
    stale = [tmp_path / f".out.tmp-{finished.pid}-abcd_123", tmp_path / f".out.old-{finished.pid}-zz99zz99",
             tmp_path / ".out.tmp-k3j4h5g6"]  # the last one from an export that wrote no PID, an hour old
    running = [tmp_path / f".out.tmp-{os.getpid()}-running", tmp_path / f".other.tmp-{finished.pid}-abcdefgh"]
    for path in stale + running:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"partial")
    os.utime(stale[2], (past, past))

    args = ["--store", str(store.root), "export", "t@round-1", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert [p for p in stale if p.exists()] == []
    assert all(p.is_dir() for p in running)  # a live process's export and another output's are left alone
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")) == [running[0].name]


def test_export_to_an_unwritable_place_is_one_line_before_any_work(tmp_path, store):
    import os

    plain_file = tmp_path / "notes.txt"
    plain_file.write_text("a file, not a folder")
    cases = [(plain_file / "out", f"--out {plain_file / 'out'} is inside {plain_file}, which is a file, not a folder"),
             (plain_file / "a" / "b", f"--out {plain_file / 'a' / 'b'} is inside {plain_file}, which is a file")]
    if os.path.isdir("/proc"):
        cases += [(Path("/proc/spkprune-export"), "cannot write in /proc for --out /proc/spkprune-export"),
                  (Path("/proc/spkprune/export"), "cannot create /proc/spkprune for --out")]
    for out, start in cases:
        # an unknown reference: the error about --out proves nothing was loaded first
        result = CliRunner().invoke(app, ["--store", str(store.root), "export", "t@round-7", "--out", str(out)])
        assert _cli_error(result).startswith(f"error: {start}"), (out, result.stderr)
        with pytest.raises(SpkpruneError, match=re.escape(start)):
            export_checkpoint("t@round-1", out, store=store)
    assert plain_file.read_text() == "a file, not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "store"]


def test_failed_export_removes_the_folders_it_created(tmp_path, store):
    out = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(SpkpruneError, match="has no tag 'round-7'"):
        export_checkpoint("t@round-7", out, store=store)
    assert not (tmp_path / "new").exists()

"""Checkpoints: blob format, save/load from every reference form, build_model, sparsity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from spkprune.checkpoint import sources
from spkprune.checkpoint import (
    FORMAT,
    MASK_PREFIX,
    Checkpoint,
    build_model,
    from_tensors,
    load_checkpoint,
    model_from_ref,
    prunable_keys,
    save_checkpoint,
    sparsity_report,
    tensor_summary,
    to_tensors,
)
from spkprune.errors import SpkpruneError
from spkprune.store import Store

DIGITS = "spikformer-2-64-digits"


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "store")


@pytest.fixture(scope="module")
def digits_model():
    from spkprune.models import create_model

    torch.manual_seed(0)
    return create_model(DIGITS)


def digits_checkpoint(model, sparsity: float = 0.5, seed: int = 0) -> Checkpoint:
    """The model's weights with a random mask on each prunable weight, pruned weights zeroed like IMP does."""
    gen = torch.Generator().manual_seed(seed)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    masks = {}
    for key in model.prunable_weights():
        masks[key] = torch.rand(state[key].shape, generator=gen) >= sparsity
        state[key] = state[key] * masks[key]
    meta = {"arch": DIGITS, "config": model.config.to_dict(), "selector": None, "seed": seed,
            "metrics": {"top1": 0.25}}
    return Checkpoint(state, masks, meta)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------------------------------- format
def test_blob_layout_matches_the_documented_format(store: Store):
    state = {"layer.weight": torch.randn(4, 3), "layer.bias": torch.randn(4)}
    masks = {"layer.weight": torch.tensor([[1, 0, 1]] * 4, dtype=torch.bool)}
    art = save_checkpoint(store, "net", "main", Checkpoint(state, masks, {"arch": "custom", "seed": 7}))
    with safe_open(str(art.path), framework="pt") as handle:
        assert sorted(handle.keys()) == ["__mask__.layer.weight", "layer.bias", "layer.weight"]
        assert handle.get_tensor("__mask__.layer.weight").dtype == torch.bool
        metadata = handle.metadata()
    assert metadata["format"] == FORMAT and metadata["format_version"] == "1"
    meta = json.loads(metadata["meta"])
    assert meta == art.meta
    assert meta["arch"] == "custom" and meta["seed"] == 7 and meta["parent"] is None
    assert meta["created"].endswith("Z")


def test_to_and_from_tensors_round_trip():
    ckpt = Checkpoint({"a": torch.arange(6.0).view(2, 3)}, {"a": torch.ones(2, 3, dtype=torch.bool)}, {"arch": "x"})
    tensors, metadata = to_tensors(ckpt)
    assert set(tensors) == {"a", MASK_PREFIX + "a"}
    back = from_tensors(tensors, metadata, "r")
    assert_same_tensors(back.state_dict, ckpt.state_dict)
    assert_same_tensors(back.masks, ckpt.masks)
    assert back.meta == {"arch": "x"} and back.ref == "r"


def test_bad_masks_are_refused():
    with pytest.raises(ValueError, match="must be torch.bool"):
        to_tensors(Checkpoint({"a": torch.zeros(2)}, {"a": torch.ones(2)}))
    with pytest.raises(ValueError, match="has shape"):
        to_tensors(Checkpoint({"a": torch.zeros(2)}, {"a": torch.ones(3, dtype=torch.bool)}))
    with pytest.raises(ValueError, match="matches no weight"):
        to_tensors(Checkpoint({"a": torch.zeros(2)}, {"b": torch.ones(2, dtype=torch.bool)}))


def test_newer_format_version_is_refused():
    with pytest.raises(SpkpruneError, match="format version '2'.*upgrade spkprune"):
        from_tensors({"a": torch.zeros(1)}, {"format": FORMAT, "format_version": "2", "meta": "{}"}, "x.safetensors")


@pytest.mark.parametrize(
    "meta_text, kind",
    [("[1, 2]", "a JSON array"), ('"text"', "a JSON string"), ("7.5", "a JSON number"), ("null", "JSON null")],
)
def test_metadata_that_is_json_but_not_an_object_is_one_line(tmp_path: Path, meta_text: str, kind: str):
    from typer.testing import CliRunner

    from spkprune.cli import app

    path = tmp_path / "odd.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": FORMAT, "format_version": "1", "meta": meta_text})
    message = f"{path} is corrupt: its metadata is {kind}, not a JSON object"
    with pytest.raises(SpkpruneError) as info:
        load_checkpoint(str(path), None)
    assert str(info.value) == message
    result = CliRunner().invoke(app, ["--store", str(tmp_path / "store"), "show", str(path)])
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [f"error: {message}"]


# ----------------------------------------------------------------------------------------- save / load
def test_save_and_load_by_store_reference_is_bit_exact(store: Store, digits_model):
    ckpt = digits_checkpoint(digits_model)
    init = save_checkpoint(store, "net", "init", ckpt)
    art = save_checkpoint(store, "net", "main", ckpt, parent=init.ref)
    assert art.parent == "net@init" and art.meta["parent"] == "net@init"
    for ref in ("net", "net@main"):
        loaded = load_checkpoint(ref, store)
        assert loaded.ref == "net@main"
        assert_same_tensors(loaded.state_dict, ckpt.state_dict)
        assert_same_tensors(loaded.masks, ckpt.masks)
        assert loaded.meta["metrics"] == {"top1": 0.25} and loaded.meta["seed"] == 0
    assert ckpt.meta.get("parent") is None, "save_checkpoint must not change the caller's checkpoint"


def test_save_fills_sparsity_from_the_preset(store: Store, digits_model):
    ckpt = digits_checkpoint(digits_model)
    art = save_checkpoint(store, "net", "main", ckpt)
    expected = sparsity_report(ckpt.state_dict, ckpt.masks, digits_model.prunable_weights())
    assert art.meta["sparsity"] == expected
    assert 0.45 < expected["prunable"] < 0.55


def test_load_a_blob_file_and_a_plain_state_dict_file(store: Store, tmp_path: Path, digits_model):
    ckpt = digits_checkpoint(digits_model)
    art = save_checkpoint(store, "net", "main", ckpt)
    copy = tmp_path / "copy.safetensors"
    shutil.copyfile(art.path, copy)
    loaded = load_checkpoint(str(copy), store)
    assert loaded.ref == str(copy) and loaded.meta["arch"] == DIGITS
    assert_same_tensors(loaded.masks, ckpt.masks)

    plain = tmp_path / "plain.safetensors"
    save_file(digits_model.state_dict(), str(plain))
    bare = load_checkpoint(plain, None)
    assert bare.meta == {} and bare.masks == {}
    with pytest.raises(SpkpruneError, match=r"plain.safetensors carries no architecture .*pass --arch PRESET"):
        build_model(bare)
    model = build_model(bare, arch=DIGITS)
    assert_same_tensors(model.state_dict(), digits_model.state_dict())


def test_truncated_and_foreign_files_name_the_file(tmp_path: Path, digits_model):
    good = tmp_path / "good.safetensors"
    save_file(digits_model.state_dict(), str(good))
    data = good.read_bytes()
    for name, content, reason in [
        ("cut-header.safetensors", data[:100], "header length points past the end"),
        ("cut-tensors.safetensors", data[: len(data) - 10], "tensor .* extends past the end of the file"),
        ("tiny.safetensors", b"abc", "only 3 bytes, shorter than a safetensors header"),
        ("text.safetensors", b"x" * 64, "header length points past the end"),
    ]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(SpkpruneError, match=rf"{name} is not a valid safetensors file: {reason}"):
            load_checkpoint(str(path), None)
    torch.save({"w": torch.zeros(1)}, tmp_path / "orig.pth")
    with pytest.raises(SpkpruneError, match=r"orig.pth is a pickled PyTorch checkpoint.*spkprune import"):
        load_checkpoint(str(tmp_path / "orig.pth"), None)
    with pytest.raises(SpkpruneError, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing.safetensors"), None)


def test_bare_name_prefers_the_store_and_needs_one(store: Store, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpkpruneError, match="no store is open"):
        load_checkpoint("net", None)
    with pytest.raises(SpkpruneError, match="no artifact named 'net'"):
        load_checkpoint("net", store)


def test_folder_and_hub_references_delegate_to_the_format_readers(monkeypatch, tmp_path: Path):
    folder = tmp_path / "exported"
    folder.mkdir()
    seen = []

    def read_folder(path):
        seen.append(Path(path))
        return Checkpoint({"w": torch.ones(2)}, {}, {"arch": "x"}, ref=None)

    monkeypatch.setattr(sources, "read_folder", read_folder)
    monkeypatch.setattr(sources, "download_ref", lambda ref: folder if ref == "hf://org/repo@round-3" else None)

    assert load_checkpoint(str(folder), None).ref == str(folder)
    hub_ckpt = load_checkpoint("hf://org/repo@round-3", None)
    assert hub_ckpt.ref == "hf://org/repo@round-3"
    assert torch.equal(hub_ckpt.state_dict["w"], torch.ones(2))
    assert seen == [folder, folder]


# ------------------------------------------------------------------------------------------- models
def test_build_model_loads_weights_strictly(store: Store, digits_model):
    ckpt = digits_checkpoint(digits_model)
    save_checkpoint(store, "net", "main", ckpt)
    model = model_from_ref("net", store)
    assert model.preset == DIGITS
    assert_same_tensors(model.state_dict(), ckpt.state_dict)

    broken = Checkpoint(dict(ckpt.state_dict), {}, dict(ckpt.meta), ref="broken")
    broken.state_dict["head.weight"] = torch.zeros(3, 64)
    with pytest.raises(SpkpruneError, match=r"^broken: .*head.weight expected \[10, 64\] received \[3, 64\]"):
        build_model(broken)


def test_build_model_keeps_config_overrides(digits_model):
    from spkprune.models import create_model

    model = create_model(DIGITS, timesteps=2)
    ckpt = Checkpoint(model.state_dict(), {}, {"arch": DIGITS, "config": model.config.to_dict()})
    assert build_model(ckpt).config.timesteps == 2


def test_build_model_attaches_token_selectors(store: Store):
    from spkprune.models import create_model
    from spkprune.models.selector import attach_selectors, selector_config

    model = create_model("spikformer-4-64-digits")
    attach_selectors(model, {"locations": [1, 2], "keep": 0.75, "scorer": "learned"})
    config = selector_config(model)
    ckpt = Checkpoint(model.state_dict(), {}, {"arch": "spikformer-4-64-digits", "selector": config})
    assert any(k.startswith("token_selectors.") for k in ckpt.state_dict)
    save_checkpoint(store, "sel", "main", ckpt)
    rebuilt = model_from_ref("sel", store)
    assert_same_tensors(rebuilt.state_dict(), model.state_dict())

    no_config = Checkpoint(model.state_dict(), {}, {"arch": "spikformer-4-64-digits"}, ref="x")
    with pytest.raises(SpkpruneError, match="token_selectors.* weights but no selector configuration"):
        build_model(no_config)


def test_prunable_keys_come_from_the_preset(digits_model):
    assert prunable_keys({"arch": DIGITS}) == list(digits_model.prunable_weights())
    assert prunable_keys({"arch": "no-such-preset"}) is None


# ----------------------------------------------------------------------------------------- sparsity
def test_sparsity_report_counts_masked_weights_exactly():
    state = {
        "conv.weight": torch.tensor([[1.0, 0.0], [3.0, 4.0]]),  # the 0.0 is a trained zero, not pruned
        "fc.weight": torch.ones(2, 3),
        "fc.bias": torch.ones(3),
        "norm.weight": torch.ones(2),  # an (unused) LayerNorm still counts as a parameter
        "bn.running_mean": torch.zeros(5),
        "bn.running_var": torch.ones(5),
        "bn.num_batches_tracked": torch.tensor(3),
    }
    masks = {"conv.weight": torch.tensor([[True, True], [False, True]]),
             "fc.weight": torch.tensor([[False, False, True], [True, False, True]])}
    report = sparsity_report(state, masks, ["conv.weight", "fc.weight"])
    # prunable: 4 + 6 = 10 weights, 1 + 3 = 4 pruned; total: 10 + 3 + 2 = 15 parameters (no buffers).
    assert report == {"prunable": 0.4, "total": 4 / 15, "remaining_prunable": 6, "remaining_total": 11}
    assert sparsity_report(state, {}, ["conv.weight"]) == {
        "prunable": 0.0, "total": 0.0, "remaining_prunable": 4, "remaining_total": 15}
    with pytest.raises(ValueError, match="missing from the state_dict"):
        sparsity_report(state, masks, ["nope.weight"])


def test_tensor_summary_rows():
    ckpt = Checkpoint(
        {"block.10.w": torch.zeros(2, 2), "block.9.w": torch.tensor([0.0, 1.0, 2.0])},
        {"block.9.w": torch.tensor([False, True, True])},
    )
    rows = tensor_summary(ckpt)
    assert [r["key"] for r in rows] == ["block.9.w", "block.10.w"]
    assert rows[0] == {"key": "block.9.w", "shape": "3", "dtype": "float32", "numel": 3, "zeros": 1,
                       "pruned": 1, "sparsity": 1 / 3}
    assert rows[1]["shape"] == "2x2" and rows[1]["zeros"] == 4 and rows[1]["pruned"] is None

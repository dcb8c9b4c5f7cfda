"""Push to and pull from the Hugging Face Hub, against the local stand-in in tests/hubserver.py."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from hubserver import HubServer
from spkprune.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from spkprune.cli import app
from spkprune.errors import SpkpruneError
from spkprune.checkpoint.hub import download_ref, parse_hf_ref
from spkprune.export.hub import push_folder
from spkprune.models import create_model
from spkprune.store import Store

TOKEN = "hf_spkpruneTestToken0123456789"


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """A running local Hub; huggingface_hub pointed at it with a fresh cache, a fake token and no xet."""
    import huggingface_hub.constants as constants

    with HubServer(token=TOKEN) as server:
        home = tmp_path / "hf-home"
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("HF_HOME", str(home))
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        # huggingface_hub reads these once at import: patch the module attributes it consults at call time.
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HOME", str(home))
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        yield server


@pytest.fixture(scope="module")
def ticket() -> Checkpoint:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model("spikformer-2-64-digits")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    masks = {k: torch.rand(w.shape) > 0.8 for k, w in model.prunable_weights().items()}
    state.update({k: state[k].masked_fill(~m, 0.0) for k, m in masks.items()})
    meta = {"arch": "spikformer-2-64-digits", "config": model.config.to_dict(), "metrics": {"top1": 0.5}}
    return Checkpoint(state, masks, meta)


@pytest.fixture()
def store(tmp_path, ticket) -> Store:
    st = Store.open(tmp_path / "store", create=True)
    save_checkpoint(st, "t", "round-3", ticket)
    return st


def _export(runner, store, out, *extra):
    return runner.invoke(app, ["--store", str(store.root), "export", "t@round-3", "--out", str(out), *extra])


def test_parse_hf_ref():
    assert parse_hf_ref("hf://org/repo@round-3") == ("org/repo", "round-3")
    assert parse_hf_ref("hf://org/repo") == ("org/repo", None)
    for bad in ("hf://repo", "hf://org/repo@", "hf://org/../x", "org/repo"):
        with pytest.raises(SpkpruneError):
            parse_hf_ref(bad)


def test_push_then_pull_is_bit_exact_and_works_offline(tmp_path, hub, store, ticket, monkeypatch):
    import huggingface_hub.constants as constants

    runner = CliRunner()
    out = tmp_path / "export"
    result = _export(runner, store, out, "--format", "sparse", "--push-to-hub", "org/digits", "--revision", "round-3",
                     "--private")
    assert result.exit_code == 0, result.output
    assert TOKEN not in result.output
    repo = hub.repos["org/digits"]
    assert repo.private
    assert [c["revision"] for c in repo.commits] == ["round-3"]  # exactly one commit, on the branch
    assert repo.commits[0]["paths"] == ["README.md", "config.json", "model.sparse.safetensors"]
    pushed = hub.files("org/digits", "round-3")
    assert pushed["model.sparse.safetensors"] == (out / "model.sparse.safetensors").read_bytes()
    assert "model.sparse.safetensors" not in hub.files("org/digits", "main")
    repo_requests = [r for r in hub.requests if r.path not in hub.PUBLIC_PATHS]
    assert {r.authorization for r in repo_requests} == {f"Bearer {TOKEN}"}  # the token went with every Hub call

    pulled = load_checkpoint("hf://org/digits@round-3")
    _assert_bit_identical(pulled, ticket)
    assert pulled.ref == "hf://org/digits@round-3"
    assert json.loads((download_ref("hf://org/digits@round-3") / "config.json").read_text())["format"] == "sparse"

    hub.stop()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = load_checkpoint("hf://org/digits@round-3")
    _assert_bit_identical(offline, ticket)


def _assert_bit_identical(ckpt: Checkpoint, ticket: Checkpoint) -> None:
    assert set(ckpt.state_dict) == set(ticket.state_dict)
    for key, value in ticket.state_dict.items():
        assert torch.equal(ckpt.state_dict[key].reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)), key
    assert set(ckpt.masks) == set(ticket.masks)
    assert all(torch.equal(ckpt.masks[k], m) for k, m in ticket.masks.items())


def test_dense_push_to_main_and_pull(tmp_path, hub, store, ticket):
    export = tmp_path / "dense"
    assert _export(CliRunner(), store, export, "--push-to-hub", "org/dense").exit_code == 0
    assert sorted(hub.files("org/dense")) == [".gitattributes", "README.md", "config.json", "masks.safetensors",
                                             "model.safetensors"]
    _assert_bit_identical(load_checkpoint("hf://org/dense"), ticket)


def test_dry_run_lists_files_and_contacts_nothing(tmp_path, hub, store):
    result = _export(CliRunner(), store, tmp_path / "out", "--push-to-hub", "org/dry", "--dry-run")
    assert result.exit_code == 0, result.output
    assert hub.requests == []
    for name in ("README.md", "config.json", "model.safetensors", "masks.safetensors"):
        assert f"would upload {name} (" in result.stderr
    assert "nothing was sent" in result.stderr


def test_wrong_token_is_one_line_and_export_stays(tmp_path, hub, store, monkeypatch):
    wrong = "hf_wrongTokenShouldNeverBePrinted"
    monkeypatch.setenv("HF_TOKEN", wrong)
    out = tmp_path / "out"
    result = _export(CliRunner(), store, out, "--push-to-hub", "org/secret")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: push to org/secret failed: 401")
    assert "check HF_TOKEN" in lines[0] and f"the export in {out} is intact" in lines[0]
    assert wrong not in result.output and TOKEN not in result.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "masks.safetensors",
                                                    "model.safetensors"]
    assert hub.repos == {}


def test_push_without_server_is_one_line(tmp_path, hub, store, ticket, monkeypatch):
    import huggingface_hub.constants as constants

    url = hub.url
    hub.stop()
    monkeypatch.setattr(constants, "ENDPOINT", url)
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(SpkpruneError, match=r"^push to org/x failed: .*check the network") as info:
        push_folder(folder, "org/x")
    assert "\n" not in str(info.value) and (folder / "config.json").exists()


def test_pull_errors_are_one_line(hub, monkeypatch):
    import huggingface_hub.constants as constants

    with pytest.raises(SpkpruneError, match=r"^cannot fetch hf://org/missing: ") as info:
        download_ref("hf://org/missing")
    assert "\n" not in str(info.value)
    hub.stop()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SpkpruneError, match="not in the local cache"):
        download_ref("hf://org/never-downloaded@round-1")

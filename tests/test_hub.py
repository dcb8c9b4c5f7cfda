"""Push to and pull from the Hugging Face Hub, against the local stand-in in tests/hubserver.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from hubserver import HubServer
from spkprune.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from spkprune.cli import app
from spkprune.errors import SpkpruneError
from spkprune.checkpoint.hub import download_ref, hub_unreachable, parse_hf_ref
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
    _assert_token_nowhere(store.root, out, tmp_path / "hf-home" / "hub", contents=pushed.values())


def _assert_token_nowhere(*folders: Path, contents=()) -> None:
    """Not in any file below `folders` (store metadata, the export's card and config.json, the Hub cache), nor in
    `contents` (bytes that reached the Hub)."""
    files = [path for folder in folders for path in folder.rglob("*") if path.is_file()]
    assert files
    for path in files:
        assert TOKEN.encode() not in path.read_bytes(), path
    for content in contents:
        assert TOKEN.encode() not in content


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
    assert all(wrong.encode() not in path.read_bytes() for path in out.iterdir())
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


# ------------------------------------------------------------------------------------------ offline
# The clock starts after the imports (torch alone takes seconds on a busy machine): it times the Hub work only.
TIMED_CLI = """
import sys, time
import huggingface_hub.file_download, huggingface_hub.hf_api
from spkprune.cli import app
start = time.monotonic()
try:
    app(sys.argv[2:], prog_name="spkprune")
finally:
    open(sys.argv[1], "w").write(repr(time.monotonic() - start))
"""


def _cli(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """`spkprune ARGS` in a fresh process, so that huggingface_hub reads HF_* at import as it does for users.
    Returns the process and the seconds its command took."""
    base = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and not k.endswith("OFFLINE")}
    env = {**base, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_XET": "1",
           "HF_TOKEN": TOKEN, **env}
    timing = tmp_path / "seconds.txt"
    process = subprocess.run([sys.executable, "-c", TIMED_CLI, str(timing), *args], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    return process, float(timing.read_text())


def _one_error_line(process: subprocess.CompletedProcess) -> str:
    assert process.returncode == 2, process.stderr
    assert "Traceback" not in process.stderr and TOKEN not in process.stdout + process.stderr
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), process.stderr
    return lines[0]


@pytest.fixture()
def refused_url():
    """An endpoint on 127.0.0.1 that refuses connections: its port is bound, so nobody else takes it, but not
    listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield "http://127.0.0.1:%d" % sock.getsockname()[1]


@pytest.fixture()
def listener():
    """A listening socket that records whether anything connected (see `_connections`)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        sock.setblocking(False)
        yield sock


def _connections(sock: socket.socket) -> int:
    count = 0
    while True:
        try:
            sock.accept()[0].close()
        except BlockingIOError:
            return count
        count += 1


def test_pull_without_network_fails_fast_in_one_line(tmp_path, refused_url):
    process, seconds = _cli(tmp_path, "--store", str(tmp_path / "store"), "evaluate", "hf://org/repo",
                            HF_ENDPOINT=refused_url)
    line = _one_error_line(process)
    assert seconds < 5, seconds  # the Hub client's retries took ~30 s
    assert line.startswith(f"error: cannot fetch hf://org/repo: cannot reach the Hugging Face Hub at {refused_url} "
                           "(connection refused), and this revision is not in the local cache")
    assert "spkprune export" in line and "HF_HUB_OFFLINE=1" in line


def test_push_without_network_fails_fast_in_one_line(tmp_path, refused_url, store):
    out = tmp_path / "out"
    process, seconds = _cli(tmp_path, "--store", str(store.root), "export", "t@round-3", "--out", str(out),
                            "--push-to-hub", "org/x", "--revision", "round-3", HF_ENDPOINT=refused_url)
    line = _one_error_line(process)
    assert seconds < 5, seconds
    assert line == (f"error: push to org/x@round-3 failed: cannot reach the Hugging Face Hub at {refused_url} "
                    f"(connection refused) — check the network connection and HF_ENDPOINT; the export in {out} is intact")
    assert (out / "config.json").is_file()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="relies on Linux dropping SYNs to a full backlog")
def test_probe_gives_up_on_a_silent_endpoint(monkeypatch):
    """A network that drops packets (no refusal) is answered within the probe's timeout, not the client's."""
    import huggingface_hub.constants as constants

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        url = "http://127.0.0.1:%d" % server.getsockname()[1]
        backlog = [socket.socket() for _ in range(4)]
        for sock in backlog:
            sock.setblocking(False)
            sock.connect_ex(server.getsockname())
        monkeypatch.setattr(constants, "ENDPOINT", url)
        start = time.monotonic()
        reason = hub_unreachable(timeout=0.5)
        elapsed = time.monotonic() - start
        for sock in backlog:
            sock.close()
    assert reason == f"cannot reach the Hugging Face Hub at {url} (no answer from 127.0.0.1 within 0.5 s)"
    assert elapsed < 3, elapsed


def test_offline_mode_contacts_nothing_and_names_the_cache(tmp_path, listener, store, monkeypatch):
    import huggingface_hub.constants as constants

    url = "http://127.0.0.1:%d" % listener.getsockname()[1]
    pull, _ = _cli(tmp_path, "--store", str(store.root), "evaluate", "hf://org/never@round-1", HF_ENDPOINT=url,
                   HF_HUB_OFFLINE="1")
    cache = tmp_path / "hf-home" / "hub"
    assert _one_error_line(pull) == (f"error: cannot fetch hf://org/never@round-1: not in the local cache ({cache}) and "
                                     "HF_HUB_OFFLINE is set — unset it to download it once, or pass a local copy "
                                     "(a folder written by `spkprune export REF --out DIR` loads as DIR)")
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "f").mkdir()
    with pytest.raises(SpkpruneError, match="^push to org/x failed: HF_HUB_OFFLINE is set, so nothing can be sent"):
        push_folder(tmp_path / "f", "org/x")
    assert _connections(listener) == 0


def test_cached_revision_loads_without_network(tmp_path, hub, store, ticket, refused_url, monkeypatch):
    import huggingface_hub.constants as constants

    assert _export(CliRunner(), store, tmp_path / "pushed", "--format", "sparse", "--push-to-hub", "org/digits",
                   "--revision", "round-3").exit_code == 0
    download_ref("hf://org/digits@round-3")  # into the cache
    hub.stop()
    process, _ = _cli(tmp_path, "export", "hf://org/digits@round-3", "--out", str(tmp_path / "offline"),
                      "--format", "sparse", HF_ENDPOINT=refused_url, HF_HUB_OFFLINE="1")
    assert process.returncode == 0, process.stderr
    assert TOKEN not in process.stdout + process.stderr
    _assert_bit_identical(load_checkpoint(tmp_path / "offline"), ticket)
    monkeypatch.setattr(constants, "ENDPOINT", refused_url)  # no HF_HUB_OFFLINE: the probe fails, the cache serves
    _assert_bit_identical(load_checkpoint("hf://org/digits@round-3"), ticket)

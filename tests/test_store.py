"""The store: round trips, references, corruption, crash safety (SIGKILL mid-save) and concurrent writers."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from spkprune.errors import SpkpruneError
from spkprune.store import Store, parse_ref
from spkprune.store.store import BLOB_DIR, INDEX_FILE, TMP_DIR

REPO = Path(__file__).resolve().parents[1]


def sample_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(7, 5, generator=gen),
        "half": torch.randn(3, 4, generator=gen).half(),
        "bf16": torch.randn(6, generator=gen).bfloat16(),
        "count": torch.tensor(12345678901, dtype=torch.int64),
        "mask": torch.rand(7, 5, generator=gen) > 0.5,
        "empty": torch.zeros(0, 3),
    }


def index_rows(root: Path) -> list[tuple]:
    con = sqlite3.connect(root / INDEX_FILE)
    try:
        return con.execute("SELECT * FROM artifacts ORDER BY name, tag").fetchall()
    finally:
        con.close()


def blob_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in (root / BLOB_DIR).rglob("*") if p.is_file())


def snapshot(root: Path) -> tuple:
    return index_rows(root), blob_files(root)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "store")


# ------------------------------------------------------------------------------------------- round trips
def test_put_resolve_read_round_trip_is_bit_exact(store: Store):
    tensors = sample_tensors()
    art = store.put("net", "main", tensors, {"note": "hello"}, {"arch": "x", "metrics": {"top1": 0.5}}, parent="a@init")

    got = store.resolve("net")
    assert got == art
    assert got.ref == "net@main" and got.kind == "checkpoint" and got.parent == "a@init"
    assert got.meta == {"arch": "x", "metrics": {"top1": 0.5}}
    data = got.path.read_bytes()
    assert got.size == len(data) and got.sha256 == hashlib.sha256(data).hexdigest()
    assert got.path == store.root / BLOB_DIR / got.sha256[:2] / f"{got.sha256}.safetensors"

    read, metadata = store.read(got)
    assert metadata == {"note": "hello"}
    assert set(read) == set(tensors)
    for key, value in tensors.items():
        assert read[key].dtype == value.dtype
        assert read[key].shape == value.shape
        assert torch.equal(read[key], value), key


def test_bare_name_means_main_and_tags_are_separate(store: Store):
    store.put("net", "init", {"w": torch.zeros(2)})
    store.put("net", "main", {"w": torch.ones(2)})
    assert parse_ref("net") == ("net", "main")
    assert torch.equal(store.read(store.resolve("net"))[0]["w"], torch.ones(2))
    assert torch.equal(store.read(store.resolve("net@init"))[0]["w"], torch.zeros(2))
    assert [a.tag for a in store.list("net")] == ["init", "main"]
    assert store.exists("net", "init") and not store.exists("net", "round-1")


def test_unknown_name_and_tag_list_what_exists(store: Store):
    store.put("alpha", "main", {"w": torch.zeros(1)})
    store.put("alpha", "round-1", {"w": torch.ones(1)})
    with pytest.raises(SpkpruneError, match=r"no artifact named 'alphx'.*did you mean 'alpha'.*known names: alpha"):
        store.resolve("alphx")
    with pytest.raises(SpkpruneError, match=r"'alpha' has no tag 'round-9'.*its tags: main, round-1"):
        store.resolve("alpha@round-9")
    with pytest.raises(SpkpruneError, match="empty tag"):
        store.resolve("alpha@")


def test_put_refuses_an_existing_tag_unless_replace(store: Store):
    first = store.put("net", "main", {"w": torch.zeros(3)})
    before = snapshot(store.root)
    with pytest.raises(SpkpruneError, match="net@main already exists"):
        store.put("net", "main", {"w": torch.ones(3)})
    assert snapshot(store.root) == before

    second = store.put("net", "main", {"w": torch.ones(3)}, replace=True)
    assert second.sha256 != first.sha256
    assert not first.path.exists(), "the replaced, now unreferenced blob is removed"
    assert [a.sha256 for a in store.list()] == [second.sha256]


def test_identical_content_shares_one_blob_and_delete_keeps_it_while_referenced(store: Store):
    a = store.put("a", "main", {"w": torch.arange(4.0)})
    b = store.put("b", "main", {"w": torch.arange(4.0)})
    assert a.path == b.path
    store.delete("a", "main")
    assert b.path.exists() and torch.equal(store.read(store.resolve("b"))[0]["w"], torch.arange(4.0))
    store.delete("b", "main")
    assert not b.path.exists() and store.list() == []
    with pytest.raises(SpkpruneError, match="no artifact named 'b'"):
        store.delete("b", "main")


def test_invalid_names_are_refused(store: Store):
    for bad in ("", "../x", "a/b", ".hidden", "-x", "x y", "m.safetensors"):
        with pytest.raises(SpkpruneError, match="invalid name"):
            store.put(bad, "main", {"w": torch.zeros(1)})
    assert store.list() == []


def test_lineage_walks_parents_to_the_root(store: Store):
    store.put("base", "init", {"w": torch.zeros(1)}, parent=None)
    store.put("base", "main", {"w": torch.ones(1)}, parent="base@init")
    store.put("ticket", "round-1", {"w": torch.full((1,), 2.0)}, parent="base")
    leaf = store.put("ticket", "round-2", {"w": torch.full((1,), 3.0)}, parent="ticket@round-1")
    chain, outside = store.lineage(leaf)
    assert [a.ref for a in chain] == ["ticket@round-1", "base@main", "base@init"] and outside is None

    orphan = store.put("imported", "main", {"w": torch.zeros(2)}, parent="hf://org/repo")
    assert store.lineage(orphan) == ([], "hf://org/repo")


# -------------------------------------------------------------------------------------------- corruption
def test_flipped_byte_is_reported_as_corrupt_never_loaded(store: Store):
    art = store.put("net", "main", {"w": torch.randn(64)})
    data = bytearray(art.path.read_bytes())
    data[-5] ^= 0x01
    art.path.write_bytes(bytes(data))
    with pytest.raises(SpkpruneError, match=r"artifact net@main is corrupt: sha256 mismatch"):
        store.read(art)


def test_missing_blob_is_reported_as_corrupt(store: Store):
    art = store.put("net", "main", {"w": torch.randn(8)})
    art.path.unlink()
    with pytest.raises(SpkpruneError, match=r"artifact net@main is corrupt: its blob .* is missing"):
        store.read(store.resolve("net"))


# ------------------------------------------------------------------------------------------- opening
def test_open_creates_in_missing_or_empty_directory(tmp_path: Path):
    Store.open(tmp_path / "new" / "nested")
    (tmp_path / "empty").mkdir()
    Store.open(tmp_path / "empty")
    for root in (tmp_path / "new" / "nested", tmp_path / "empty"):
        assert (root / INDEX_FILE).is_file() and (root / BLOB_DIR).is_dir()
        assert Store.open(root, create=False).list() == []


def test_non_empty_directory_that_is_not_a_store_is_refused_and_untouched(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SpkpruneError, match=r"exists and is not a spkprune store"):
        Store.open(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_foreign_or_garbage_index_is_refused(tmp_path: Path):
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / INDEX_FILE).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(SpkpruneError, match="is not a spkprune store index"):
        Store.open(garbage)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    con = sqlite3.connect(foreign / INDEX_FILE)
    con.execute("CREATE TABLE people (name TEXT)")
    con.commit()
    con.close()
    with pytest.raises(SpkpruneError, match="not a spkprune store index"):
        Store.open(foreign)


def test_file_path_and_missing_store_without_create(tmp_path: Path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SpkpruneError, match="is a file, not a store directory"):
        Store.open(tmp_path / "file")
    with pytest.raises(SpkpruneError, match="no store at"):
        Store.open(tmp_path / "missing", create=False)
    assert not (tmp_path / "missing").exists()


def test_newer_store_version_is_refused(store: Store):
    con = sqlite3.connect(store.index_path)
    con.execute("UPDATE store_info SET value = '99' WHERE key = 'version'")
    con.commit()
    con.close()
    with pytest.raises(SpkpruneError, match="has version 99; this spkprune reads version 1"):
        Store.open(store.root)


def test_orphan_temp_files_are_cleaned_but_live_ones_kept(store: Store):
    tmp_dir = store.root / TMP_DIR
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_dir / f"{int(dead.stdout)}.deadbeef.part"
    orphan.write_bytes(b"half a blob")
    live = tmp_dir / f"{os.getpid()}.cafe.part"
    live.write_bytes(b"being written")
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what a live writer holds
    try:
        Store.open(store.root)
        assert not orphan.exists()
        assert live.exists()
    finally:
        os.close(fd)
    # Unlocked but its pid (ours) is alive and the file is fresh: it may be a writer between create and lock.
    assert store.gc() == 0 and live.exists()


def test_gc_removes_unreferenced_blobs_only(store: Store):
    kept = store.put("net", "main", {"w": torch.ones(2)})
    stray = store.root / BLOB_DIR / "ab" / ("ab" + "0" * 62 + ".safetensors")
    stray.parent.mkdir(exist_ok=True)
    stray.write_bytes(b"left by a crash between rename and commit")
    assert store.gc() == 1
    assert not stray.exists() and kept.path.exists()


# ------------------------------------------------------------------------------------- crash and races
WRITER = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    from spkprune.store import Store
    store = Store.open(sys.argv[1])
    prefix, count, numel = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    print("ready", flush=True)
    for i in range(count):
        gen = torch.Generator().manual_seed(hash((prefix, i)) % 2**31)
        tensors = {"w": torch.randn(numel, generator=gen), "i": torch.tensor(i)}
        art = store.put(f"{prefix}-{i}", "main", tensors, {"i": str(i)}, {"i": i, "prefix": prefix})
        print(art.ref, art.sha256, flush=True)
    """
)


def start_writer(tmp_path: Path, root: Path, prefix: str, count: int, numel: int) -> subprocess.Popen:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(script), str(root), prefix, str(count), str(numel)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def check_every_artifact(store: Store) -> dict[str, str]:
    """Every indexed artifact reads back with a matching sha256 and the content its writer gave it."""
    found = {}
    for art in store.list():
        tensors, metadata = store.read(art)  # raises on any sha256 mismatch
        assert int(tensors["i"]) == art.meta["i"] == int(metadata["i"])
        found[art.ref] = art.sha256
    return found


def test_writer_killed_mid_save_leaves_every_finished_artifact_intact(tmp_path: Path):
    root = tmp_path / "store"
    Store.open(root)
    rng = random.Random(1234)
    finished: dict[str, str] = {}
    for attempt in range(3):
        proc = start_writer(tmp_path, root, f"run{attempt}", count=10_000, numel=200_000)  # ~800 KB blobs
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        for line in out.split("\n")[:-1]:  # a line the kill cut short (no newline yet) was never reported
            ref, sha = line.split()
            finished[ref] = sha
        store = Store.open(root)  # recovers the journal and removes the killed writer's temp file
        assert list((root / TMP_DIR).iterdir()) == []
        indexed = check_every_artifact(store)
        # Every save that returned is in the index with the same bytes; at most one more (committed, not printed).
        assert all(indexed.get(ref) == sha for ref, sha in finished.items())
        assert len(indexed) - len(finished) in (0, 1)
        finished.update(indexed)
    assert len(finished) >= 1, "the writers should have finished some saves before being killed"
    store.gc()
    referenced = {a.sha256 for a in store.list()}
    assert {p.stem for p in (root / BLOB_DIR).glob("*/*.safetensors")} == referenced


def test_two_concurrent_writers_lose_nothing(tmp_path: Path):
    root = tmp_path / "store"  # not created yet: both writers race to create it, too
    count = 15
    procs = [start_writer(tmp_path, root, prefix, count, numel=20_000) for prefix in ("left", "right")]
    outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
    store = Store.open(root)
    indexed = check_every_artifact(store)
    expected = {f"{prefix}-{i}@main" for prefix in ("left", "right") for i in range(count)}
    assert set(indexed) == expected
    reported = dict(line.split() for out, _ in outputs for line in out.splitlines() if "@" in line)
    assert reported == indexed
    assert json.loads(json.dumps(store.resolve("left-3").meta)) == {"i": 3, "prefix": "left"}


LOCK_HOLDER = textwrap.dedent(
    """
    import sqlite3, sys, time
    con = sqlite3.connect(sys.argv[1], isolation_level=None)
    con.execute("BEGIN IMMEDIATE")  # the lock a process switching the same file to WAL holds for a moment
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
    con.execute("COMMIT")
    """
)


def test_creating_a_store_waits_for_another_creator_holding_the_index(tmp_path: Path):
    # SQLite refuses the switch to WAL at once ("database is locked", no busy wait) while another process holds the
    # file's write lock: what a second process creating the same store meets in the same millisecond.
    root = tmp_path / "store"
    root.mkdir()
    sqlite3.connect(root / INDEX_FILE).close()  # the empty index a first creator has just made
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(root / INDEX_FILE), "1.0"], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "locked"
    started = time.monotonic()
    store = Store.open(root)
    assert time.monotonic() - started > 0.2  # it waited for the lock instead of failing
    assert holder.wait(timeout=30) == 0
    store.put("a", "main", sample_tensors(), {}, {"ok": True})
    assert store.resolve("a").meta == {"ok": True}


def test_update_meta_changes_index_and_blob_header_and_keeps_tensors(tmp_path):
    import json as _json

    from spkprune.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from spkprune.store import Store

    store = Store.open(tmp_path / "s")
    weights = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    masks = {"w": torch.tensor([[True, False, True], [True, True, False]])}
    save_checkpoint(store, "a", "main", Checkpoint(weights, masks, {"metrics": {"top1": 0.5}}), parent="x@init")
    updated = store.update_meta("a", "flops", {"totals": {"dense_macs": 12}})
    assert updated.meta["flops"] == {"totals": {"dense_macs": 12}} and updated.meta["metrics"] == {"top1": 0.5}
    assert updated.parent == "x@init" and updated.kind == "checkpoint"
    reread = Store.open(tmp_path / "s").resolve("a")
    assert reread.meta["flops"] == updated.meta["flops"]
    _, header = store.read(reread)
    assert _json.loads(header["meta"])["flops"] == {"totals": {"dense_macs": 12}}
    ckpt = load_checkpoint("a", store)
    assert torch.equal(ckpt.state_dict["w"], weights["w"]) and torch.equal(ckpt.masks["w"], masks["w"])

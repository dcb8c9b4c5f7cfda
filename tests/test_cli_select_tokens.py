"""`spkprune select-tokens`: the stored result, the one-JSON-document output, the pictures, and bad input (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from spkprune.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from spkprune.cli import app
from spkprune.models import create_model
from spkprune.checkpoint import build_model
from spkprune.store import Store
from firekit import amplified

ARCH = "spikformer-2-64-digits"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_checkpoint() -> Checkpoint:
    """A small 3-block digits model (16 channels, T=2) whose BatchNorms make it fire, with a pruned fc1."""
    from spkprune.training import TrainConfig

    torch.manual_seed(0)
    model = create_model(ARCH, embed_dim=16, num_heads=2, timesteps=2, depth=3)
    amplified(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    key = "block.0.mlp.fc1_linear.weight"
    mask = torch.ones_like(state[key], dtype=torch.bool)
    mask[:, ::2] = False
    state[key] = state[key] * mask
    train = TrainConfig.for_dataset("digits", batch_size=256, eval_batch_size=512, seed=1).to_dict()
    meta = {"arch": ARCH, "config": model.config.to_dict(), "selector": None, "train": train, "seed": 1}
    return Checkpoint(state, {key: mask}, meta)


@pytest.fixture
def store(tmp_path: Path, tiny_checkpoint) -> Store:
    store = Store.open(tmp_path / "store")
    save_checkpoint(store, "dense", "main", tiny_checkpoint)
    return store


def cli(store: Store, *args: str):
    return CliRunner().invoke(app, ["--store", str(store.root), *args])


def test_firing_rate_selector_without_fine_tuning_is_stored_with_its_lineage(store):
    result = cli(store, "select-tokens", "dense", "--keep", "0.7", "--scorer", "firing-rate", "--epochs", "0",
                 "--name", "sts", "--format", "json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["ref"] == "sts@main" and doc["parent"] == "dense@main" and doc["scorer"] == "firing-rate"
    # 16 tokens: int(16 * 0.7) = 11 before block 1, int(16 * 0.49) = 7 before block 2.
    assert [(r["block"], r["selector"], r["tokens"]) for r in doc["rows"]] == [(0, False, 16), (1, True, 11), (2, True, 7)]
    ckpt = load_checkpoint("sts", store)
    assert ckpt.meta["selector"] == {"locations": [1, 2], "keep": [0.7, 0.49], "scorer": "firing-rate"}
    assert ckpt.meta["parent"] == "dense@main"
    assert ckpt.meta["metrics"]["top1"] == doc["student_top1"]
    assert ckpt.meta["selection"]["teacher_metrics"]["top1"] == doc["teacher_top1"]
    source = load_checkpoint("dense", store)
    assert list(ckpt.masks) == list(source.masks)
    assert torch.equal(ckpt.masks["block.0.mlp.fc1_linear.weight"], source.masks["block.0.mlp.fc1_linear.weight"])
    for key, value in source.state_dict.items():  # no training: the backbone is bit-identical
        assert torch.equal(ckpt.state_dict[key], value), key
    model = build_model(ckpt)
    assert sorted(model.token_selectors) == ["1", "2"]


def test_learned_selector_fine_tunes_and_prints_teacher_and_student(store):
    result = cli(store, "select-tokens", "dense", "--keep", "0.9,0.5", "--name", "learned", "--epochs", "1",
                 "--seed", "4", "--distill-weight", "0.25", "--format", "json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [r["tokens"] for r in doc["rows"]] == [16, 14, 8]
    assert doc["change_points"] == pytest.approx(100 * (doc["student_top1"] - doc["teacher_top1"]), abs=1e-3)
    ckpt = load_checkpoint("learned", store)
    assert ckpt.meta["selector"]["scorer"] == "learned"
    assert ckpt.meta["selection"]["distill_weight"] == 0.25 and ckpt.meta["train"]["seed"] == 4
    assert "token_selectors.2.mlp.0.weight" in ckpt.state_dict
    key = "block.0.mlp.fc1_linear.weight"
    assert not ckpt.state_dict[key][~ckpt.masks[key]].any()
    table = cli(store, "select-tokens", "dense", "--keep", "0.7", "--scorer", "random", "--epochs", "0",
                "--name", "rand")
    assert table.exit_code == 0, table.output
    assert "teacher_top1" in table.stdout and "rand@main" in table.stdout


def test_analyze_writes_pictures_and_the_kept_vs_dropped_table(store, tmp_path):
    out = tmp_path / "pictures"
    result = cli(store, "select-tokens", "dense", "--analyze", "--keep", "0.5", "--out", str(out), "--samples", "40",
                 "--format", "json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [(r["block"], r["tokens_in"], r["tokens_kept"]) for r in doc["rows"]] == [(1, 16.0, 8.0), (2, 8.0, 4.0)]
    for row in doc["rows"]:  # the firing-rate scorer keeps the tokens that fire most, in every image
        assert row["rate_kept"] >= row["rate_dropped"] and row["kept_fires_more"] == 1.0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["kept_tokens.png", "kept_vs_dropped.csv", "rate_summary.png", "token_rates.png"]
    for name in names:
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert doc["pictures"]["kept_tokens"] == str(out / "kept_tokens.png")
    assert not Store.open(store.root).exists("dense", "epoch-1")  # analysing writes nothing to the store
    assert [a.ref for a in store.list()] == ["dense@main"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--keep", "1.5", "--name", "x"], "must lie in (0, 1]"),
        (["--keep", "0", "--name", "x"], "must lie in (0, 1]"),
        (["--keep", "abc", "--name", "x"], "--keep: must be a ratio or comma-separated ratios"),
        (["--locations", "3", "--name", "x"], "do not exist"),
        (["--locations", "0", "--name", "x"], "do not exist"),
        (["--keep", "0.1", "--name", "x"], "leaves 0 of 16 tokens"),
        (["--keep", "0.7"], "give --name NAME"),
        (["--scorer", "learned", "--epochs", "0", "--name", "x"], "must be trained"),
        (["--scorer", "bogus", "--name", "x"], "'bogus' is not one of 'learned', 'firing-rate', 'random'"),
        (["--name", "dense"], "already exists"),
        (["--analyze", "--scorer", "learned"], "has no trained selector"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(store, args, message):
    before = [(a.ref, a.sha256) for a in store.list()]
    result = cli(store, "select-tokens", "dense", *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert [(a.ref, a.sha256) for a in store.list()] == before


def test_a_model_with_one_block_has_no_room_for_a_selector(tmp_path):
    store = Store.open(tmp_path / "store")
    model = create_model(ARCH, depth=1, embed_dim=16, num_heads=2, timesteps=1)
    meta = {"arch": ARCH, "config": model.config.to_dict(), "selector": None}
    save_checkpoint(store, "one", "main", Checkpoint(model.state_dict(), {}, meta))
    result = cli(store, "select-tokens", "one", "--keep", "0.7", "--scorer", "firing-rate", "--epochs", "0",
                 "--name", "x")
    assert result.exit_code == 2 and "needs at least 2 blocks" in result.stderr


@pytest.mark.slow
def test_digits_end_to_end_dense_then_learned_and_firing_rate_selectors(tmp_path):
    """Train a dense digits model briefly, then select tokens with every scorer through the CLI."""
    from spkprune.training import TrainConfig, fit

    torch.manual_seed(0)
    model = create_model(ARCH)
    cfg = TrainConfig.for_dataset("digits", epochs=6, seed=0)
    dense_top1 = fit(model, cfg, progress=False).metrics["top1"]
    assert dense_top1 > 0.7
    store = Store.open(tmp_path / "store")
    meta = {"arch": ARCH, "config": model.config.to_dict(), "selector": None, "train": cfg.to_dict()}
    save_checkpoint(store, "dense", "main", Checkpoint(model.state_dict(), {}, meta))
    results = {}
    for scorer, epochs in (("learned", "2"), ("firing-rate", "0"), ("random", "0")):
        out = cli(store, "select-tokens", "dense", "--keep", "0.9", "--scorer", scorer, "--epochs", epochs,
                  "--name", scorer, "--format", "json")
        assert out.exit_code == 0, out.output
        results[scorer] = json.loads(out.stdout)
        assert results[scorer]["teacher_top1"] == pytest.approx(dense_top1)
        assert [r["tokens"] for r in results[scorer]["rows"]] == [16, 14]
    assert results["learned"]["student_top1"] > dense_top1 - 0.05
    assert results["firing-rate"]["student_top1"] > dense_top1 - 0.05
    pictures = tmp_path / "pictures"
    out = cli(store, "select-tokens", "learned", "--analyze", "--out", str(pictures), "--format", "json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["rows"][0]["tokens_kept"] == 14.0
    assert (pictures / "kept_tokens.png").stat().st_size > 1000

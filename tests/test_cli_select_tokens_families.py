"""`spkprune select-tokens` on the Spike-driven Transformer and QKFormer, and token skipping (`--action skip`) on
every family: stored, reloaded, evaluated and counted like the other selectors."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from spkprune.checkpoint import Checkpoint, build_model, load_checkpoint, save_checkpoint
from spkprune.cli import app
from spkprune.models import create_model
from spkprune.models.selector import selector_config, tokens_per_block
from spkprune.store import Store
from spkprune.training import TrainConfig
from firekit import amplified

pytestmark = pytest.mark.usefixtures("one_thread")

# Tiny digits models (T=2) with room for two selectors: SDT before blocks 1, 2 (16 tokens); QKFormer in its last
# stage, before blocks 2, 3 (4 tokens); Spikformer before blocks 1, 2 (16 tokens).
TINY = {
    "sdt": ("sdt-2-64-digits", dict(embed_dim=16, num_heads=2, timesteps=2, depth=3)),
    "qkformer": ("qkformer-3-64-digits", dict(embed_dim=16, num_heads=2, timesteps=2, depth=4)),
    "spikformer": ("spikformer-2-64-digits", dict(embed_dim=16, num_heads=2, timesteps=2, depth=3)),
}


def tiny_checkpoint(family: str) -> Checkpoint:
    """A small digits model whose BatchNorms make it fire."""
    preset, overrides = TINY[family]
    torch.manual_seed(0)
    model = create_model(preset, **overrides)
    amplified(model)
    train = TrainConfig.for_dataset("digits", batch_size=256, eval_batch_size=512, seed=1).to_dict()
    meta = {"arch": preset, "config": model.config.to_dict(), "selector": None, "train": train, "seed": 1}
    return Checkpoint({k: v.clone() for k, v in model.state_dict().items()}, {}, meta)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    store = Store.open(tmp_path_factory.mktemp("families") / "store")
    for family in TINY:
        save_checkpoint(store, family, "main", tiny_checkpoint(family))
    return store


def cli(store: Store, *args: str):
    return CliRunner().invoke(app, ["--store", str(store.root), *args])


def select(store: Store, *args: str) -> dict:
    result = cli(store, "select-tokens", *args, "--format", "json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("family, blocks, tokens", [
    ("sdt", [1, 2], [16, 11, 7]),
    ("qkformer", [2, 3], [64, 16, 2, 1]),  # 4 tokens in the last stage: int(4 * 0.7) = 2, int(4 * 0.49) = 1
])
def test_select_tokens_on_the_new_families_is_stored_and_reloaded(store, family, blocks, tokens):
    doc = select(store, family, "--keep", "0.7", "--scorer", "firing-rate", "--epochs", "0", "--name", f"{family}-fr")
    assert [r["tokens"] for r in doc["rows"]] == tokens
    assert [r["block"] for r in doc["rows"] if r["selector"]] == blocks
    ckpt = load_checkpoint(f"{family}-fr", store)
    assert ckpt.meta["selector"] == {"locations": blocks, "keep": [0.7, 0.49], "scorer": "firing-rate"}
    model = build_model(ckpt)
    assert sorted(int(k) for k in model.token_selectors) == blocks and tokens_per_block(model) == tokens
    evaluated = cli(store, "evaluate", f"{family}-fr", "--batch-size", "512", "--format", "json")  # one batch, as
    # select-tokens evaluated it: a QKFormer's logits depend on the batch (docs/model-families.md)
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["top1"] == pytest.approx(doc["student_top1"])


def test_the_learned_scorer_fine_tunes_a_spike_driven_transformer(store):
    doc = select(store, "sdt", "--keep", "0.9,0.5", "--name", "sdt-learned", "--epochs", "1", "--seed", "4")
    assert doc["scorer"] == "learned" and [r["tokens"] for r in doc["rows"]] == [16, 14, 8]
    ckpt = load_checkpoint("sdt-learned", store)
    assert "token_selectors.1.mlp.0.weight" in ckpt.state_dict
    assert build_model(ckpt).state_dict()["token_selectors.2.mlp.2.weight"].shape == (2, 8)


def test_a_refused_location_names_the_family_and_the_allowed_ones(store):
    before = sorted(a.ref for a in store.list())
    result = cli(store, "select-tokens", "qkformer", "--locations", "1", "--scorer", "random", "--epochs", "0",
                 "--name", "bad")
    assert result.exit_code == 2
    line = result.output.strip()
    expected = ("error: selector location(s) [1] do not exist in qkformer-3-64-digits (qkformer family): choose "
                "among [2, 3] (selectors sit only in the last stage")
    assert "\n" not in line and line.startswith(expected), line
    assert sorted(a.ref for a in store.list()) == before


@pytest.mark.parametrize("family", list(TINY))
def test_skipping_is_stored_reloaded_and_evaluated(store, family):
    doc = select(store, family, "--keep", "0.5", "--action", "skip", "--name", f"{family}-skip")
    assert doc["scorer"] == "firing-rate" and doc["action"] == "skip"  # the defaults with --action skip
    ckpt = load_checkpoint(f"{family}-skip", store)
    assert ckpt.meta["selector"]["action"] == "skip" and ckpt.meta["selection"]["epochs"] == 0
    source = load_checkpoint(family, store)
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in source.state_dict.items())  # training-free
    model = build_model(ckpt)
    assert selector_config(model)["action"] == "skip"
    evaluated = json.loads(cli(store, "evaluate", f"{family}-skip", "--batch-size", "512", "--format", "json").stdout)
    assert evaluated["top1"] == pytest.approx(doc["student_top1"])


def test_skipped_tokens_do_no_work_in_the_counted_macs(store):
    """Skipping and dropping at the same keep do the same block work (only the pooling differs), less than dense."""
    select(store, "spikformer", "--keep", "0.5", "--scorer", "firing-rate", "--epochs", "0", "--name", "sp-drop")
    select(store, "spikformer", "--keep", "0.5", "--action", "skip", "--name", "sp-skip2")
    macs = {}
    for name in ("spikformer", "sp-drop", "sp-skip2"):
        result = cli(store, "flops", "report", name, "--format", "json")
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        macs[name] = report["totals"]["dense_macs"]
        assert report["tokens_per_block"] == ([16, 16, 16] if name == "spikformer" else [16, 8, 4])
    assert macs["sp-skip2"] == macs["sp-drop"] < macs["spikformer"]


@pytest.mark.parametrize("family, grid", [("sdt", 4), ("qkformer", 2)])
def test_the_firing_rate_analysis_draws_the_new_families(store, family, grid, tmp_path):
    result = cli(store, "select-tokens", family, "--analyze", "--keep", "0.5", "--out", str(tmp_path / "pictures"))
    assert result.exit_code == 0, result.output
    names = {"kept_tokens.png", "token_rates.png", "rate_summary.png", "kept_vs_dropped.csv"}
    assert names <= {p.name for p in (tmp_path / "pictures").iterdir()}
    table = (tmp_path / "pictures" / "kept_vs_dropped.csv").read_text().splitlines()
    assert table[0].startswith("block,") and len(table) == 3  # two selectors
    assert float(table[1].split(",")[2]) == grid * grid  # tokens in: the selectors' grid

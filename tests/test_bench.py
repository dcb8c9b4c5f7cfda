"""`spkprune bench`: measured inference speed. Tests check the behaviour (the shape of the result, speed-ups against
the first reference, what is stored and where it shows), never how fast anything is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from spkprune.bench import BenchSettings, run_bench
from spkprune.bench.measure import random_inputs
from spkprune.bench.memory import peak_growth_megabytes
from spkprune.bench.report import percentile
from spkprune.checkpoint import Checkpoint, save_checkpoint
from spkprune.cli import app
from spkprune.errors import SpkpruneError
from spkprune.export.card import model_card
from spkprune.models import create_model, get_config
from spkprune.store import Store

DIGITS = "spikformer-2-64-digits"
FAST = {"repeats": 2, "warmup": 1, "batch_size": 4}
ROW_KEYS = {"ref", "throughput", "latency_ms", "latency_p90_ms", "peak_memory_mb", "speedup", "timesteps",
            "batch_size", "dense_macs", "nonzero_macs", "model_mb", "kind", "saved_to"}


def _ticket(model: torch.nn.Module) -> tuple[dict, dict]:
    """Half of every prunable weight zeroed by magnitude, with its masks."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    masks = {}
    for key, weight in model.prunable_weights().items():
        threshold = weight.detach().abs().flatten().median()
        masks[key] = weight.detach().abs() > threshold
        state[key] = state[key] * masks[key]
    return state, masks


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    store = Store.open(tmp_path_factory.mktemp("bench") / "store")
    torch.manual_seed(0)
    model = create_model(DIGITS)
    meta = {"arch": DIGITS, "config": model.config.to_dict()}
    save_checkpoint(store, "dense", "main", Checkpoint(model.state_dict(), {}, meta))
    state, masks = _ticket(model)
    save_checkpoint(store, "ticket", "main", Checkpoint(state, masks, meta), parent="dense@main")
    return store


def _bench(store, *refs, **options):
    return run_bench(store, BenchSettings(refs=refs, **{**FAST, **options}), progress=False)


def run_cli(*args: str):
    try:
        runner = CliRunner(mix_stderr=False)
    except TypeError:
        runner = CliRunner()
    return runner.invoke(app, list(args))


# ------------------------------------------------------------------------------------------------ the result
def test_json_has_one_entry_per_reference_with_the_figures(store, one_thread):
    result = run_cli("--store", str(store.root), "bench", "dense", "ticket", "--repeats", "2", "--warmup", "1",
                     "--batch-size", "4", "--no-save", "--no-progress", "--format", "json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [row["ref"] for row in doc["rows"]] == ["dense", "ticket"]
    for row in doc["rows"]:
        assert ROW_KEYS <= set(row)
        assert row["throughput"] > 0 and row["latency_ms"] > 0 and row["latency_p90_ms"] >= row["latency_ms"] * 0.999
        assert row["timesteps"] == 4 and row["batch_size"] == 4
    assert doc["baseline"] == "dense" and doc["settings"]["repeats"] == 2
    assert {"cpu", "cores", "torch", "torch_threads", "device"} <= set(doc["machine"])


def test_speedups_are_throughput_ratios_against_the_first_reference(store, one_thread):
    report = _bench(store, "ticket", "dense", DIGITS, save=False)
    first, *others = report.results
    assert first.speedup == 1.0 and report.baseline == "ticket"
    for result in others:
        assert result.speedup == pytest.approx(result.throughput / first.throughput)
    assert [r.kind for r in report.results] == ["checkpoint", "checkpoint", "preset"]


def test_the_counted_macs_sit_beside_the_measured_figures(store, one_thread):
    report = _bench(store, "dense", "ticket", save=False)
    dense, ticket = report.results
    assert dense.dense_macs == ticket.dense_macs and dense.nonzero_macs == dense.dense_macs
    assert ticket.nonzero_macs < dense.nonzero_macs


def test_a_preset_is_measured_with_fresh_weights(one_thread):
    report = _bench(None, DIGITS, batch_size=2)
    (result,) = report.results
    assert result.ref == DIGITS and result.kind == "preset" and result.saved_to is None
    assert result.timesteps == get_config(DIGITS).timesteps
    assert any("preset" in note for note in report.notes)


def test_threads_apply_during_the_run_only(one_thread):
    report = _bench(None, DIGITS, threads=2, repeats=1, warmup=0)
    assert report.machine["torch_threads"] == 2 and torch.get_num_threads() == 1


def test_the_csv_and_table_formats_render(store, one_thread):
    for fmt, marker in (("csv", "latency_ms"), ("table", "speedup"), ("md", "| ref |")):
        result = run_cli("--store", str(store.root), "bench", DIGITS, "--repeats", "1", "--warmup", "0",
                         "--batch-size", "2", "--no-progress", "--format", fmt)
        assert result.exit_code == 0 and marker in result.stdout, (fmt, result.output)


# ----------------------------------------------------------------------------------------------- stored result
def test_the_result_is_stored_with_the_machine_and_shows_in_the_model_card(tmp_path, store, one_thread):
    local = Store.open(tmp_path / "store")
    art = store.resolve("ticket")
    tensors, metadata = store.read(art)
    local.put("ticket", "main", tensors, metadata, art.meta)

    report = _bench(local, DIGITS, "ticket")
    assert report.results[1].saved_to == "ticket@main" and report.results[0].saved_to is None
    stored = local.resolve("ticket").meta["bench"]
    assert stored["ref"] == "ticket" and stored["baseline"] == DIGITS and stored["compared_with"] == [DIGITS, "ticket"]
    assert stored["speedup"] == pytest.approx(report.results[1].speedup)
    assert {"cpu", "cores", "torch"} <= set(stored["machine"]) and stored["settings"]["batch_size"] == 4
    _, header = local.read(local.resolve("ticket"))
    assert json.loads(header["meta"])["bench"] == stored  # the blob's header carries it too

    card = model_card(local.resolve("ticket").meta, name="ticket", fmt="dense", dtype="float32", has_masks=True)
    section = card.split("## Measured speed", 1)[1].split("\n## ", 1)[0]
    assert "images/s" in section and stored["machine"]["cpu"] in section and f"`{DIGITS}`" in section


def test_no_save_leaves_the_store_alone(tmp_path, store, one_thread):
    local = Store.open(tmp_path / "store")
    art = store.resolve("dense")
    local.put("dense", "main", *store.read(art), art.meta)
    before = local.resolve("dense").sha256
    _bench(local, "dense", save=False)
    assert "bench" not in local.resolve("dense").meta and local.resolve("dense").sha256 == before


def test_save_needs_store_references(store):
    with pytest.raises(SpkpruneError, match=rf"--save keeps the result with checkpoints in the store, and '{DIGITS}'"):
        _bench(store, "dense", DIGITS, save=True)


def test_a_card_without_a_bench_result_has_no_speed_section():
    assert "Measured speed" not in model_card({"arch": DIGITS}, name="x", fmt="dense", dtype="float32",
                                              has_masks=False)


# ------------------------------------------------------------------------------------------------- the pieces
def test_inputs_are_seeded_and_shaped_like_the_model():
    single, batch = random_inputs(get_config(DIGITS), 3, seed=5, device=torch.device("cpu"))
    again, _ = random_inputs(get_config(DIGITS), 3, seed=5, device=torch.device("cpu"))
    assert batch.shape == (3, 1, 8, 8) and single.shape == (1, 1, 8, 8) and torch.equal(single, again)
    dvs = get_config("spikformer-2-256-dvs128")
    _, frames = random_inputs(dvs, 2, seed=0, device=torch.device("cpu"))
    assert frames.shape == (2, dvs.timesteps, dvs.in_channels, dvs.img_size, dvs.img_size)


def test_percentile_interpolates_between_ranks():
    assert percentile([5.0], 90) == 5.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0], 90) == pytest.approx(10.0)
    assert percentile([1.0, 3.0], 50) == 2.0


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_cpu_peak_memory_sees_a_large_temporary():
    growth = peak_growth_megabytes(lambda: torch.ones(64 * 2**20 // 4).add_(1), torch.device("cpu"))
    assert growth is None or growth >= 48  # None: this kernel refuses to reset the peak


# ------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "values, message",
    [
        ({"refs": ("a",), "batch_size": 0}, "batch_size: must be >= 1 (got 0)"),
        ({"refs": ("a",), "repeats": 0}, "repeats: must be >= 1 (got 0)"),
        ({"refs": ("a",), "warmup": -1}, "warmup: must be >= 0 (got -1)"),
        ({"refs": ("a", "a")}, "'a' is given twice"),
        ({"refs": ()}, "refs:"),
    ],
)
def test_the_settings_refuse_bad_values_in_one_line(values, message):
    with pytest.raises(SpkpruneError) as caught:
        BenchSettings(**values)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_cli_parameters_are_the_settings_fields():
    import typer.main

    params = {p.name: p for p in typer.main.get_command(app).commands["bench"].params}
    assert set(params) == set(BenchSettings.model_fields) | {"fmt", "progress"}
    assert params["refs"].param_type_name == "argument" and params["refs"].required and params["refs"].nargs == -1
    assert params["batch_size"].default == 32 and params["device"].default == "auto"

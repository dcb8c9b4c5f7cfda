"""The family registry (spkprune.models.families): presets of every family through one interface, the store round
trip of each new family, one-line errors across families, the commands on SDT and QKFormer, and list-models."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import spkprune
from spkprune.checkpoint import Checkpoint, build_model, load_checkpoint, save_checkpoint
from spkprune.cli import app
from spkprune.errors import SpkpruneError
from spkprune.models import (
    FAMILIES,
    SpikingModel,
    create_model,
    family_of,
    family_of_config,
    family_of_preset,
    family_of_state_dict,
    get_config,
    list_models,
    model_from_config,
)
from spkprune.models.qkformer_presets import QKFORMER_PRESETS
from spkprune.models.sdt_presets import SDT_PRESETS
from spkprune.store import Store

torch.set_num_threads(1)
DIGITS = {"spikformer": "spikformer-2-64-digits", "sdt": "sdt-2-64-digits", "qkformer": "qkformer-3-64-digits"}
NEW_FAMILIES = ["sdt", "qkformer"]


def _cli(store, *args):
    return CliRunner().invoke(app, ["--store", str(store), *args])


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def _checkpoint(model) -> Checkpoint:
    meta = {"arch": model.preset, "config": model.config.to_dict(), "selector": None}
    return Checkpoint(dict(model.state_dict()), {}, meta, None)


# ---- the registry ----------------------------------------------------------------------------------------------------


def test_three_families_and_their_presets_in_one_list():
    assert list(FAMILIES) == ["spikformer", "sdt", "qkformer"]
    assert list_models(family="sdt") == sorted(SDT_PRESETS)
    assert list_models(family="qkformer") == sorted(QKFORMER_PRESETS)
    assert list_models() == sorted(sum((f.list() for f in FAMILIES.values()), []))
    assert set(DIGITS.values()) <= set(list_models("*digits*"))
    assert all(name.startswith(family.name + "-") for family in FAMILIES.values() for name in family.presets)
    assert spkprune.list_models() == list_models()


@pytest.mark.parametrize("preset", list_models())
def test_every_preset_builds_through_the_registry_with_the_shared_interface(preset):
    family = family_of_preset(preset)
    with torch.device("meta"):  # shapes only: the ImageNet presets stay cheap
        model = create_model(preset)
    assert isinstance(model, family.model_class) and isinstance(model, SpikingModel)
    assert model.family == family.name and family_of(model) is family and model.preset == preset
    cfg = model.config
    assert isinstance(cfg, family.config_class) and get_config(preset) == cfg
    for field in ("num_classes", "in_channels", "img_size", "timesteps", "dataset", "depth", "embed_dim"):
        assert getattr(cfg, field) is not None or field == "dataset", field
    assert cfg.variant in ("cifar", "dvs", "imagenet")
    assert family_of_config(cfg.to_dict()) is family
    assert model.prunable_weights() and model.neuron_sites() and model.num_tokens >= 1
    assert isinstance(model.selector_locations(), list)
    assert not any(k.startswith("token_selectors.") for k in model.state_dict())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_stored_configuration_rebuilds_its_own_family(family):
    model = create_model(DIGITS[family], timesteps=2)
    again = model_from_config(model.config.to_dict())
    assert type(again) is type(model) and again.config == model.config and again.preset is None
    named = model_from_config(model.config.to_dict(), preset=DIGITS[family])
    assert named.preset == DIGITS[family] and named.config.timesteps == 2
    assert family_of_state_dict(model.state_dict()) is FAMILIES[family]


def test_the_family_flags_agree_with_the_models():
    for family in FAMILIES.values():
        model = family.create(DIGITS[family.name])
        assert bool(model.selector_locations()) == family.token_selection, family.name


def test_unknown_presets_and_options_say_which_family():
    with pytest.raises(SpkpruneError, match=r"unknown preset 'sdt-2-64-digit'; known presets: sdt-2-64-digits"):
        create_model("sdt-2-64-digit")
    with pytest.raises(SpkpruneError) as err:
        create_model("sdt-2-64-digits", num_pools=2)
    message = str(err.value)
    assert "unknown option(s) for preset sdt-2-64-digits (sdt family): num_pools (a spikformer option)" in message
    with pytest.raises(SpkpruneError, match="variant .a spikformer/qkformer option"):
        get_config("sdt-2-64-digits", variant="dvs")
    with pytest.raises(SpkpruneError, match="unknown model family 'nope'; known families: spikformer, sdt, qkformer"):
        list_models(family="nope")


def test_a_configuration_of_another_family_names_both():
    sdt_config = get_config("sdt-2-64-digits").to_dict()
    with pytest.raises(SpkpruneError) as err:
        model_from_config(sdt_config, preset="spikformer-2-64-digits")
    assert str(err.value) == (
        "preset spikformer-2-64-digits is of the spikformer family but the configuration is of the sdt family"
    )
    with pytest.raises(SpkpruneError, match="none of the known families"):
        model_from_config({"img_size": 8})


# ---- checkpoints and the store ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_a_model_round_trips_through_the_store(tmp_path, family):
    torch.manual_seed(0)
    model = create_model(DIGITS[family], timesteps=2).eval()
    store = Store.open(tmp_path / "store", create=True)
    save_checkpoint(store, "m", "main", _checkpoint(model))
    loaded = build_model(load_checkpoint("m", store)).eval()
    assert type(loaded) is type(model) and loaded.config == model.config and loaded.preset == model.preset
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_a_checkpoint_of_one_family_under_another_preset_is_one_line(tmp_path):
    sdt = create_model("sdt-2-64-digits")
    ckpt = _checkpoint(sdt)
    ckpt.meta["arch"] = "qkformer-3-64-digits"  # the preset of one family, the configuration of another
    ckpt.ref = "x@main"
    with pytest.raises(SpkpruneError) as err:
        build_model(ckpt)
    assert str(err.value) == (
        "preset qkformer-3-64-digits is of the qkformer family but the configuration stored in x@main is of the "
        "sdt family"
    )
    plain = Checkpoint(dict(sdt.state_dict()), {}, {}, "sdt.safetensors")
    with pytest.raises(SpkpruneError) as err:
        build_model(plain, arch="spikformer-2-64-digits")
    assert str(err.value).startswith(
        "sdt.safetensors holds weights of the sdt family (Spike-driven Transformer (V1)), which do not load into "
        "spikformer-2-64-digits of the spikformer family"
    )


def test_import_of_another_familys_weights_is_one_line_and_leaves_the_store(tmp_path):
    path = tmp_path / "sdt.pth"
    torch.save(create_model("sdt-2-64-digits").state_dict(), path)
    root = tmp_path / "store"
    Store.open(root, create=True)
    before = _tree_digest(root)
    line = _one_error_line(_cli(root, "import", str(path), "--arch", "qkformer-3-64-digits", "--name", "x"))
    assert "holds weights of the sdt family" in line and "qkformer-3-64-digits of the qkformer family" in line
    assert _tree_digest(root) == before
    assert _cli(root, "import", str(path), "--arch", "sdt-2-64-digits", "--name", "x").exit_code == 0


# ---- the commands ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=NEW_FAMILIES)
def pipeline(request, tmp_path_factory):
    """train -> evaluate -> imp (2 rounds to 50%) -> export (sparse) of one family's digits preset."""
    family = request.param
    root = tmp_path_factory.mktemp(f"{family}-store")
    small = ["--epochs", "1", "--batch-size", "32", "--limit-batches", "2", "--no-progress"]
    train = _cli(root, "train", "--arch", DIGITS[family], "--dataset", "digits", *small, "--name", "s")
    assert train.exit_code == 0, train.output
    evaluate = _cli(root, "evaluate", "s", "--format", "json")
    assert evaluate.exit_code == 0, evaluate.output
    imp = _cli(root, "imp", "s", "--rounds", "2", "--target", "0.5", "--epochs-per-round", "1", "--name", "st",
               "--no-progress")
    assert imp.exit_code == 0, imp.output
    out = root.parent / f"{family}-export"
    export = _cli(root, "export", "st@round-2", "--out", str(out), "--format", "sparse")
    assert export.exit_code == 0, export.output
    return family, root, json.loads(evaluate.stdout), out


@pytest.mark.slow
def test_train_evaluate_imp_and_export_work_for_every_new_family(pipeline):
    family, root, evaluated, out = pipeline
    store = Store.open(root, create=False)
    main = load_checkpoint("s", store)
    assert main.meta["arch"] == DIGITS[family] and family_of_config(main.meta["config"]) is FAMILIES[family]
    assert evaluated["dataset"] == "digits" and evaluated["samples"] == 360
    assert [r["site"] for r in evaluated["rows"]] == list(create_model(DIGITS[family]).neuron_sites())
    ticket = load_checkpoint("st@round-2", store)
    assert ticket.meta["sparsity"]["prunable"] == pytest.approx(0.5, abs=1e-3)
    model = build_model(ticket)
    assert family_of(model).name == family
    assert set(ticket.masks) == set(model.prunable_weights())
    config = json.loads((out / "config.json").read_text())
    assert config["family"] == family and config["preset"] == DIGITS[family]
    card = (out / "README.md").read_text()
    assert f"- **family**: {FAMILIES[family].title} (`{family}`;" in card
    exported = build_model(load_checkpoint(str(out)))
    assert all(torch.equal(v, exported.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_flops_counts_and_select_tokens_refuses_a_missing_location_in_one_line(pipeline):
    family, root, _, _ = pipeline
    report = _cli(root, "flops", "report", "s", "--dataset", "digits", "--format", "json")
    assert report.exit_code == 0, report.output
    assert json.loads(report.stdout)["totals"]["dense_macs"] > 0
    before = _tree_digest(root)
    line = _one_error_line(_cli(root, "select-tokens", "st@round-2", "--locations", "0", "--name", "sel"))
    allowed = {"sdt": [1], "qkformer": [2]}[family]  # select-tokens works on both, at these blocks only
    assert line.startswith(f"error: selector location(s) [0] do not exist in {DIGITS[family]} ({family} family): "
                           f"choose among {allowed}")
    assert _tree_digest(root) == before


def test_flops_report_names_the_blocks_of_every_qkformer_stage(tmp_path):
    result = _cli(tmp_path / "store", "flops", "report", "qkformer-3-64-digits", "--format", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["blocks"] == ["stage1.0", "stage2.0", "stage3.0"]


def test_a_dataset_misfit_suggests_a_preset_of_the_same_family(tmp_path):
    line = _one_error_line(_cli(tmp_path / "store", "train", "--arch", "sdt-2-64-digits", "--dataset", "cifar10",
                                "--name", "x"))
    assert "does not fit dataset cifar10" in line and "such as sdt-2-256-cifar10" in line


# ---- list-models -----------------------------------------------------------------------------------------------------


def test_list_models_shows_every_family_and_preset():
    result = CliRunner().invoke(app, ["list-models", "--format", "csv"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["preset"] for r in rows] == [p for f in FAMILIES.values() for p in f.list()]
    by_preset = {r["preset"]: r for r in rows}
    assert by_preset["sdt-2-64-digits"] == {"family": "sdt", "preset": "sdt-2-64-digits", "dataset": "digits",
                                            "input": "1x8x8", "timesteps": "4", "params": "163650"}
    assert by_preset["qkformer-4-384-cifar10"]["params"] == "6706234"  # the original's own log
    table = CliRunner().invoke(app, ["list-models", "*digits*"])
    assert table.exit_code == 0 and "qkformer-3-64-digits" in table.stdout and "140,162" in table.stdout
    doc = json.loads(CliRunner().invoke(app, ["list-models", "--family", "qkformer", "--format", "json"]).stdout)
    assert {r["family"] for r in doc} == {"qkformer"} and len(doc) == len(QKFORMER_PRESETS)


def test_list_models_bad_input_is_one_line(tmp_path):
    line = _one_error_line(_cli(tmp_path, "list-models", "--family", "nope"))
    assert line == "error: unknown model family 'nope'; known families: spikformer, sdt, qkformer"
    assert _one_error_line(_cli(tmp_path, "list-models", "zzz*")) == "error: no preset matches 'zzz*'"

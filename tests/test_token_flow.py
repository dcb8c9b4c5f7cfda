"""Token selectors on every family (spkprune/models/token_flow.py): the Spike-driven Transformer's and QKFormer's
selector locations, gathered == masked, exact kept-token counts, and token skipping (TP-Spikformer)."""

from __future__ import annotations

import pytest
import torch

from spkprune.errors import SpkpruneError
from spkprune.models import create_model
from spkprune.models.selector import (
    attach_selectors,
    last_kept,
    selector_config,
    selectors_of,
    set_selector_mode,
    tokens_per_block,
)
from firekit import lively

pytestmark = pytest.mark.usefixtures("one_thread")

SCORERS = ("learned", "firing-rate", "random")
# Three blocks each with room for two selectors: SDT blocks 1, 2 (16 tokens); QKFormer's last stage, blocks 2, 3
# (a 16x16 input: 16 tokens there; the 8x8 digits give 4).
MODELS = {
    "spikformer": ("spikformer-4-64-digits", {"depth": 3, "embed_dim": 32, "num_heads": 4}, 8),
    "sdt": ("sdt-2-64-digits", {"depth": 3, "embed_dim": 32, "num_heads": 4}, 8),
    "qkformer": ("qkformer-3-64-digits", {"depth": 4, "embed_dim": 32, "num_heads": 4, "img_size": 16}, 16),
}


def images_for(family, n=12, seed=1):
    side = MODELS[family][2]
    return torch.randn(n, 1, side, side, generator=torch.Generator().manual_seed(seed)).abs()


def model_of(family, selector=None, seed=0):
    preset, overrides, _ = MODELS[family]
    torch.manual_seed(seed)
    model = lively(create_model(preset, **overrides), images_for(family, 32, seed=9))
    return attach_selectors(model, selector).eval() if selector else model


def masked_and_gathered(model, images, per_image=False):
    """Logits in mask mode and in gather mode (the same random draws); one image at a time when `per_image`."""
    def run(mode):
        set_selector_mode(model, mode)
        torch.manual_seed(5)
        with torch.no_grad():
            return torch.cat([model(x) for x in images.split(1)]) if per_image else model(images)

    return run("mask"), run("gather")


# ---- where selectors may sit -------------------------------------------------------------------------------------


def test_selector_locations_of_every_family():
    assert model_of("sdt").selector_locations() == [1, 2]
    assert model_of("qkformer").selector_locations() == [2, 3]  # stages of 1, 1, 2 blocks: the last stage only
    assert create_model("qkformer-3-64-digits").selector_locations() == [2]
    assert create_model("sdt-2-256-cifar10dvs").selector_locations() == []  # dvs_mode erodes over the grid
    assert tokens_per_block(model_of("qkformer")) == [256, 64, 16, 16]  # every stage its own grid
    model = model_of("qkformer", {"keep": 0.5, "scorer": "firing-rate"})
    assert tokens_per_block(model) == [256, 64, 8, 4]


@pytest.mark.parametrize("family", list(MODELS))
def test_a_learned_selector_adds_no_prunable_weight(family):
    bare = set(model_of(family).prunable_weights())
    selected = model_of(family, {"keep": 0.5, "scorer": "learned"})
    assert any(key.startswith("token_selectors.") for key in selected.state_dict())
    assert set(selected.prunable_weights()) == bare


@pytest.mark.parametrize("family, locations, message", [
    ("qkformer", [1], r"^selector location\(s\) \[1\] do not exist in qkformer-3-64-digits \(qkformer family\): "
                      r"choose among \[2, 3\] \(selectors sit only in the last stage \(blocks 2\.\.3\), after the last "
                      r"patch embedding: the 3x3 patch-embedding convs between stages need the full token grid"),
    ("sdt", [0], r"^selector location\(s\) \[0\] do not exist in sdt-2-64-digits \(sdt family\): choose among "
                 r"\[1, 2\] \(block 0 always sees every token; the model has 3 blocks\)$"),
])
def test_a_refused_location_is_one_line_naming_the_family_and_the_allowed_ones(family, locations, message):
    with pytest.raises(SpkpruneError, match=message) as err:
        model_of(family, {"keep": 0.7, "scorer": "firing-rate", "locations": locations})
    assert "\n" not in str(err.value)
    with pytest.raises(SpkpruneError, match=r"^sdt-2-256-cifar10dvs \(sdt family\) has no selector location: "
                                            r"dvs_mode's 3x3 erode"):
        attach_selectors(create_model("sdt-2-256-cifar10dvs"), {"keep": 0.7, "scorer": "random"})


# ---- dropping: masked == gathered, exact counts ----------------------------------------------------------------


@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize("family", ["sdt", "qkformer"])
def test_masked_forward_equals_gathered_forward_on_the_new_families(family, scorer):
    model = model_of(family, {"keep": 0.7, "scorer": scorer})
    images = images_for(family)
    # QKFormer's last proj_lif runs across the batch (the original's quirk): per image, so that the runs compare.
    masked, gathered = masked_and_gathered(model, images, per_image=family == "qkformer")
    assert torch.allclose(masked, gathered, atol=1e-5, rtol=0)
    assert masked.abs().max() > 0.1
    assert last_kept(model) == ({1: 11.0, 2: 7.0} if family == "sdt" else {2: 11.0, 3: 7.0})
    assert [s.last_mask.sum(1).unique().tolist() for s in selectors_of(model).values()] == [[11], [7]]
    detached = model_of(family)
    with torch.no_grad():
        dense = torch.cat([detached(x) for x in images.split(1)])
    assert (dense - masked).abs().max() > 1e-3  # dropping changed the answer: not two dense runs


@pytest.mark.parametrize("family", ["sdt", "qkformer"])
def test_gathered_blocks_really_see_fewer_tokens(family):
    model = model_of(family, {"keep": 0.5, "scorer": "firing-rate"})
    seen = []
    blocks = model.block if family == "sdt" else model.stage3
    for block in blocks:
        block.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[3] * args[0].shape[4]))
    with torch.no_grad():
        model(images_for(family, 3))
    assert seen == ([16, 8, 4] if family == "sdt" else [8, 4])
    assert tokens_per_block(model)[-2:] == [8, 4]


@pytest.mark.parametrize("family", ["sdt", "qkformer"])
def test_masked_tokens_touch_neither_batchnorm_statistics_nor_logits_in_training(family):
    """Training always masks: overwriting the dropped tokens by 1e6 changes nothing (BatchNorm statistics from kept
    tokens only, no key, no value, not pooled)."""
    images = images_for(family, 6)
    runs = []
    for poison in (False, True):
        model = model_of(family, {"keep": 0.5, "scorer": "random"}).train()
        for selector in selectors_of(model).values():
            if poison:
                selector.register_forward_hook(
                    lambda _m, _a, out: (out[0].masked_fill(~out[1].view(1, *out[1].shape, 1), 1e6), out[1]))
        torch.manual_seed(3)
        logits = model(images)
        runs.append((logits, [b.clone() for n, b in model.named_buffers() if "running" in n]))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_the_learned_scorer_trains_on_the_new_families():
    for family in ("sdt", "qkformer"):
        model = model_of(family, {"keep": 0.7, "scorer": "learned"}).train()
        loss = model(images_for(family, 4)).logsumexp(1).mean()
        loss.backward()
        grads = [p.grad for n, p in model.named_parameters() if n.startswith("token_selectors.")]
        assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), family


# ---- skipping (TP-Spikformer) ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(MODELS))
def test_skipping_masked_equals_gathered_and_skipped_tokens_keep_their_values(family):
    model = model_of(family, {"keep": 0.5, "scorer": "firing-rate", "action": "skip"})
    assert selector_config(model)["action"] == "skip"
    images = images_for(family, 4)
    masked, gathered = masked_and_gathered(model, images, per_image=family == "qkformer")
    assert torch.allclose(masked, gathered, atol=1e-5, rtol=0)
    dropped = model_of(family, {"keep": 0.5, "scorer": "firing-rate"})
    assert tokens_per_block(model) == tokens_per_block(dropped)  # the same work per block
    with torch.no_grad():
        assert (dropped(images[:1]) - gathered[:1]).abs().max() > 1e-4  # but the pooling sees every token
    # The tokens the first selector skips leave the blocks with the values they entered it with; all N leave.
    first = min(selectors_of(model))
    entering = {}
    model.token_selectors[str(first)].register_forward_pre_hook(lambda _m, args: entering.update(x=args[0]))
    for mode in ("mask", "gather"):
        set_selector_mode(model, mode)
        leaving, keep = final_tokens(model, images[:1])
        skipped = ~selectors_of(model)[first].last_mask[0]
        assert keep is None and leaving.shape[2] == model.num_tokens and 0 < int(skipped.sum()) < model.num_tokens
        assert torch.equal(leaving[:, 0, skipped], entering["x"][:, 0, skipped]), mode


@torch.no_grad()
def final_tokens(model, images):
    """The last block's tokens `[T, B, N, C]` as the pooling sees them, and the pooling's keep mask."""
    sequence = model.encode(images)
    if hasattr(model, "forward_tokens"):  # Spikformer
        return model.forward_tokens(model.patch_embed(sequence))
    maps, keep = model.forward_blocks(sequence)
    return maps.flatten(3).transpose(2, 3), keep


def test_skipping_everything_kept_is_the_dense_model():
    for family in MODELS:
        model = model_of(family)
        images = images_for(family, 1)
        with torch.no_grad():
            dense = model(images)
            attach_selectors(model, {"keep": 1.0, "scorer": "firing-rate", "action": "skip"})
            assert torch.allclose(model(images), dense, atol=1e-5, rtol=0), family


def test_skipping_rejects_an_unknown_action():
    with pytest.raises(SpkpruneError, match=r"unknown token action 'delete'; choose one of drop, skip"):
        model_of("sdt", {"keep": 0.5, "scorer": "firing-rate", "action": "delete"})

"""The token selector: configuration, masked == gathered, clean BatchNorm statistics, straight-through gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from spkprune.errors import SpkpruneError
from spkprune.models import create_model
from spkprune.models.selector import (
    TokenSelector,
    attach_selectors,
    cumulative_keep,
    last_kept,
    selector_config,
    selectors_of,
    set_selector_mode,
    tokens_kept,
    tokens_per_block,
)
from firekit import lively

SCORERS = ("learned", "firing-rate", "random")


pytestmark = pytest.mark.usefixtures("one_thread")


def digits_model(scorer="learned", keep=0.7, seed=0, **config):
    torch.manual_seed(seed)
    model = create_model("spikformer-4-64-digits")
    if scorer is not None:
        attach_selectors(model, {"keep": keep, "scorer": scorer, **config})
    return model


def batch(n=16, seed=1):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


# ---- configuration ----------------------------------------------------------------------------------------------


def test_cumulative_keep_follows_the_reference_code():
    assert cumulative_keep(0.7, [1, 2, 3]) == [0.7, 0.49, 0.343]
    assert cumulative_keep([0.9, 0.5], [1, 3]) == [0.9, 0.5]
    assert cumulative_keep([0.5], [1, 2]) == [0.5, 0.25]
    # The paper's CIFAR counts: 64 -> 44 -> 31 -> 21 at rho 0.7, 64 -> 32 -> 16 -> 8 at 0.5, 64 -> 57 -> 51 -> 46 at 0.9.
    assert [tokens_kept(64, r) for r in cumulative_keep(0.7, [1, 2, 3])] == [44, 31, 21]
    assert [tokens_kept(64, r) for r in cumulative_keep(0.5, [1, 2, 3])] == [32, 16, 8]
    assert [tokens_kept(64, r) for r in cumulative_keep(0.9, [1, 2, 3])] == [57, 51, 46]


def test_attach_and_config_round_trip():
    model = digits_model("firing-rate")
    config = selector_config(model)
    assert config == {"locations": [1, 2, 3], "keep": [0.7, 0.49, 0.343], "scorer": "firing-rate"}
    assert tokens_per_block(model) == [16, 11, 7, 5]
    assert sorted(model.token_selectors) == ["1", "2", "3"]
    # The dense keys are untouched; a learned selector adds token_selectors.<block>.* keys only.
    learned = digits_model("learned", locations=[2])
    extra = sorted(set(learned.state_dict()) - set(create_model("spikformer-4-64-digits").state_dict()))
    assert extra == [f"token_selectors.2.mlp.{i}.{p}" for i in (0, 2) for p in ("bias", "weight")]
    assert learned.state_dict()["token_selectors.2.mlp.0.weight"].shape == (32, 64)
    assert learned.state_dict()["token_selectors.2.mlp.2.weight"].shape == (2, 32)
    # A rebuilt model from the stored configuration loads the state_dict strictly.
    rebuilt = attach_selectors(create_model("spikformer-4-64-digits"), selector_config(learned))
    rebuilt.load_state_dict(learned.state_dict(), strict=True)
    assert "token_selectors.2.mlp.0.weight" not in learned.prunable_weights()


@pytest.mark.parametrize(
    "config, message",
    [
        ({"keep": 0.0}, "must lie in (0, 1]"),
        ({"keep": 1.5}, "must lie in (0, 1]"),
        ({"keep": [0.7, 0.8, 0.5]}, "must not increase"),
        ({"keep": [0.7, 0.5]}, "2 keep ratios for 3 selector locations"),
        ({"locations": [4]}, "do not exist"),
        ({"locations": [0]}, "do not exist"),
        ({"locations": [1, 1]}, "repeat a block"),
        ({"keep": 0.05, "locations": [1]}, "leaves 0 of 16 tokens"),
        ({"keep": 0.3}, "leaves 0 of 16 tokens"),  # 0.3**3 * 16 = 0.43
        ({"scorer": "entropy"}, "unknown token scorer"),
        ({"kept": 0.5}, "unknown token selector option"),
    ],
)
def test_bad_configurations_fail_with_one_line(config, message):
    with pytest.raises(SpkpruneError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")) as err:
        attach_selectors(create_model("spikformer-4-64-digits"), config)
    assert "\n" not in str(err.value)


def test_models_without_room_for_a_selector_are_refused():
    with pytest.raises(SpkpruneError, match="needs at least 2 blocks"):
        attach_selectors(create_model("spikformer-2-64-digits", depth=1), {"keep": 0.7})
    with pytest.raises(SpkpruneError, match="1 token"):
        attach_selectors(create_model("spikformer-2-64-digits", num_pools=3), {"keep": 0.7})


# ---- masked == gathered -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("scorer", SCORERS)
def test_masked_forward_equals_gathered_forward(scorer):
    images = batch(24)
    model = lively(digits_model(scorer), images)
    torch.manual_seed(5)
    masked = set_selector_mode(model, "mask")(images)
    masks = [s.last_mask.clone() for s in selectors_of(model).values()]
    torch.manual_seed(5)
    gathered = set_selector_mode(model, "gather")(images)
    assert [s.last_mask.tolist() for s in selectors_of(model).values()] == [m.tolist() for m in masks]
    assert torch.allclose(masked, gathered, atol=1e-5, rtol=0)
    assert masked.abs().max() > 0.1  # the network is alive, so the comparison means something
    assert last_kept(model) == {1: 11.0, 2: 7.0, 3: 5.0}
    # Each selector chose among the tokens the previous one kept (cumulative), one decision per image.
    for earlier, later in zip(masks, masks[1:]):
        assert not (later & ~earlier).any()
    assert [m.sum(1).unique().tolist() for m in masks] == [[11], [7], [5]]
    # Dropping tokens changes the answer: the comparison above is not between two dense runs.
    model.token_selectors.clear()
    assert (model(images) - masked).abs().max() > 1e-3


def test_gather_really_shrinks_the_work():
    images = batch(4)
    model = lively(digits_model("firing-rate"), images)
    seen = {}
    for index, block in enumerate(model.block):
        block.register_forward_pre_hook(lambda _m, args, i=index: seen.__setitem__(i, tuple(args[0].shape)))
    model(images)
    assert seen == {0: (4, 4, 16, 64), 1: (4, 4, 11, 64), 2: (4, 4, 7, 64), 3: (4, 4, 5, 64)}


def test_firing_rate_scorer_keeps_the_most_active_tokens():
    selector = TokenSelector(8, 0.5, "firing-rate", num_tokens=4).eval()
    tokens = torch.zeros(2, 1, 4, 8)
    tokens[:, 0, 1] = 2.0  # token 1 fires most, then token 3, then 2 and 0 tie at 0 (lowest index wins the tie)
    tokens[:, 0, 3] = 1.0
    out, keep = selector.set_mode("mask")(tokens, None)
    assert keep.tolist() == [[False, True, False, True]]
    gathered, none = selector.set_mode("gather")(tokens, None)
    assert none is None and torch.equal(gathered, tokens[:, :, [1, 3]])
    # Among tokens an earlier selector dropped, nothing is chosen even if they fire most.
    _, keep = selector.set_mode("mask")(tokens, torch.tensor([[True, False, True, True]]))
    assert keep.tolist() == [[True, False, False, True]]


def test_random_scorer_is_deterministic_given_the_torch_seed():
    images = batch(8)
    model = lively(digits_model("random"), images)
    torch.manual_seed(3)
    model(images)
    first = selectors_of(model)[1].last_mask.clone()
    torch.manual_seed(3)
    model(images)
    assert torch.equal(first, selectors_of(model)[1].last_mask)
    model(images)
    assert not torch.equal(first, selectors_of(model)[1].last_mask)


# ---- training: BatchNorm statistics and gradients ---------------------------------------------------------------


def _bn_buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def test_dropped_tokens_do_not_touch_batchnorm_statistics_or_logits():
    images = batch(12)
    model = lively(digits_model("firing-rate"), images)
    start = _bn_buffers(model)

    def train_forward(poison: float | None):
        model.load_state_dict({**model.state_dict(), **start})
        handles = []
        if poison is not None:  # overwrite every dropped token with a huge value right after its selector
            def hook(_module, _inputs, output):
                tokens, keep = output
                return tokens.masked_fill(~keep.view(1, *keep.shape, 1), poison), keep

            handles = [s.register_forward_hook(hook) for s in selectors_of(model).values()]
        model.train()
        torch.manual_seed(0)
        logits = model(images)
        for handle in handles:
            handle.remove()
        return logits, _bn_buffers(model)

    clean_logits, clean_stats = train_forward(None)
    poisoned_logits, poisoned_stats = train_forward(1e6)
    assert torch.equal(clean_logits, poisoned_logits)
    for key in clean_stats:
        assert torch.equal(clean_stats[key], poisoned_stats[key]), key
    assert any(not torch.equal(clean_stats[k], start[k]) for k in start if k.startswith("block.3"))


def test_masked_block_statistics_equal_gathered_block_statistics():
    images = batch(8)
    model = lively(digits_model(None), images)
    tokens = model.patch_embed(model.encode(images)).detach()
    keep = torch.zeros(8, 16, dtype=torch.bool)
    keep[:, ::3] = True
    block = model.block[1].train()
    start = {k: v.clone() for k, v in block.state_dict().items()}
    masked_out = block(tokens, keep)
    masked_stats = {k: v.clone() for k, v in block.state_dict().items()}
    block.load_state_dict(start)
    gathered_out = block(tokens[:, :, keep[0]], None)
    for key, value in block.state_dict().items():
        assert torch.allclose(masked_stats[key].float(), value.float(), atol=1e-6), key
    assert torch.allclose(masked_out[:, :, keep[0]], gathered_out, atol=1e-5)


def test_learned_selector_gets_straight_through_gradients_from_the_task_loss():
    images = batch(16)
    model = lively(digits_model("learned"), images).train()
    torch.manual_seed(0)
    logits = model(images)
    torch.nn.functional.cross_entropy(logits, torch.arange(16) % 10).backward()
    for location, selector in selectors_of(model).items():
        first, last = selector.mlp[0].weight.grad, selector.mlp[2].weight.grad
        assert first is not None and last is not None, location
        assert torch.isfinite(first).all() and first.abs().sum() > 0, location
        assert last.abs().sum() > 0, location
        decision = selector.last_decision
        assert decision.requires_grad and set(decision.detach().unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(decision.detach() > 0.5, selector.last_mask)
    masks = [s.last_mask for s in selectors_of(model).values()]
    kept = [int(m.sum()) for m in masks]
    assert kept[0] > kept[1] > kept[2] > 0  # cumulative: D̂ = D̂ ⊙ D shrinks the kept set
    for earlier, later in zip(masks, masks[1:]):
        assert not (later & ~earlier).any()


def test_learned_training_forward_keeps_the_dense_values_of_kept_tokens():
    """The straight-through gate multiplies by exactly 1: the forward is bit-identical to a hard-masked one."""
    images = batch(8)
    model = lively(digits_model("learned"), images).train()
    torch.manual_seed(0)
    gated = model(images)
    masks = [s.last_mask.clone() for s in selectors_of(model).values()]
    replay = iter(masks)
    for selector in selectors_of(model).values():
        selector.register_forward_hook(lambda _m, inputs, _out: (inputs[0], next(replay)))
    assert torch.equal(model(images), gated)


# ---- the selection loss and fine-tuning ---------------------------------------------------------------------------


def test_selection_loss_is_ce_plus_ratio_mse_over_selectors_plus_kl():
    from spkprune.selection import SelectionLoss, distillation_loss, keep_ratio_loss

    model = digits_model("learned")
    decisions = {1: [[1, 1, 1, 0], [1, 0, 0, 0]], 2: [[1, 1, 0, 0], [0, 0, 0, 0]], 3: [[1, 0, 0, 0], [1, 0, 0, 0]]}
    for loc, selector in selectors_of(model).items():
        selector.last_decision = torch.tensor(decisions[loc], dtype=torch.float32, requires_grad=True)
    # (0.75-0.7)^2, (0.25-0.7)^2 | (0.5-0.49)^2, (0-0.49)^2 | (0.25-0.343)^2 twice; each averaged over images.
    expected = ((0.05**2 + 0.45**2) / 2 + (0.01**2 + 0.49**2) / 2 + 0.093**2) / 3
    assert keep_ratio_loss(model).item() == pytest.approx(expected, rel=1e-5)

    student = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    teacher = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 0.0]])
    p_t, log_p_s = teacher.softmax(-1), student.log_softmax(-1)
    manual_kl = (p_t * (p_t.log() - log_p_s)).sum() / 2
    assert distillation_loss(student, teacher).item() == pytest.approx(manual_kl.item(), rel=1e-6)

    class Fixed(torch.nn.Module):
        def forward(self, images):
            return teacher

    loss_fn = SelectionLoss(Fixed(), label_smoothing=0.1)
    targets = torch.tensor([0, 1])
    total = loss_fn(model, torch.zeros(2, 1, 8, 8), targets, student)
    ce = torch.nn.functional.cross_entropy(student, targets, label_smoothing=0.1)
    assert total.item() == pytest.approx(ce.item() + 2.0 * expected + 0.5 * manual_kl.item(), rel=1e-5)
    assert loss_fn.last == pytest.approx({"ce": ce.item(), "ratio": expected, "distill": manual_kl.item()}, rel=1e-5)


def tiny_ticket():
    """A small digits model (16 channels, T=2) stored as a lottery ticket: half of every block weight pruned."""
    from spkprune.checkpoint import Checkpoint
    from spkprune.training import TrainConfig

    torch.manual_seed(0)
    model = create_model("spikformer-2-64-digits", embed_dim=16, num_heads=2, timesteps=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    masks = {}
    for key in model.prunable_weights():
        if key.startswith("block."):
            masks[key] = torch.rand(state[key].shape) > 0.5
            state[key] = state[key] * masks[key]
    train = TrainConfig.for_dataset("digits", batch_size=32, eval_batch_size=512, seed=3).to_dict()
    meta = {"arch": "spikformer-2-64-digits", "config": model.config.to_dict(), "selector": None, "train": train}
    return Checkpoint(state, masks, meta, ref="ticket@round-1")


def test_fine_tuning_a_ticket_keeps_its_masks_and_stores_the_selector():
    from torch.utils.data import Subset

    from spkprune.checkpoint import build_model, from_tensors, to_tensors
    from spkprune.data import get_dataset
    from spkprune.selection import SelectionConfig, select_tokens

    source = tiny_ticket()
    train = Subset(get_dataset("digits", "train"), range(96))
    test = Subset(get_dataset("digits", "test"), range(64))
    result = select_tokens(source, SelectionConfig(keep=0.5, scorer="learned"), epochs=1, train_data=train,
                           test_data=test, progress=False)
    ckpt = result.checkpoint
    assert ckpt.meta["selector"] == {"locations": [1], "keep": [0.5], "scorer": "learned"}
    assert ckpt.meta["selection"]["teacher"] == "ticket@round-1"
    assert ckpt.meta["selection"]["ratio_weight"] == 2.0 and ckpt.meta["selection"]["distill_weight"] == 0.5
    assert ckpt.meta["metrics"]["tokens_per_block"] == [16, 8] == result.tokens_per_block
    assert ckpt.meta["train"]["epochs"] == 1 and ckpt.meta["train"]["lr"] == pytest.approx(5e-3 * 0.2)
    assert ckpt.meta["train"]["lr_scales"] == {"token_selectors.": 0.1}  # the warm-started MLP moves slower
    assert ckpt.meta["selection"]["init"] == "firing-rate"
    assert len(result.history) == 1 and ckpt.meta["metrics"]["samples"] == 64
    # The masks are carried over unchanged and the pruned weights are still exactly zero; the rest trained.
    assert sorted(ckpt.masks) == sorted(source.masks)
    for key, mask in source.masks.items():
        assert torch.equal(ckpt.masks[key], mask)
        assert not ckpt.state_dict[key][~mask].any()
    changed = [k for k in source.masks if not torch.equal(ckpt.state_dict[k], source.state_dict[k])]
    assert len(changed) == len(source.masks)
    assert {k for k in ckpt.state_dict if k.startswith("token_selectors.")} == {
        f"token_selectors.1.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")
    }
    # The stored blob rebuilds the same model (selector attached before strict loading) with the same logits.
    rebuilt = build_model(from_tensors(*to_tensors(ckpt), ref=None)).eval()
    images = torch.stack([test[i][0] for i in range(16)])
    assert torch.equal(rebuilt(images), result.model.cpu().eval()(images))


def test_firing_rate_warm_start_ranks_like_firing_rate_and_samples_at_the_keep_ratio():
    from spkprune.data import get_dataset
    from spkprune.models.selector import selectors_of, warm_start_from_firing_rate

    torch.manual_seed(0)
    data = get_dataset("digits", "train")
    images = torch.stack([data[i][0] for i in range(128)])
    dense = create_model("spikformer-4-64-digits").eval()
    learned = attach_selectors(copy.deepcopy(dense), {"keep": 0.7, "scorer": "learned"})
    rate = attach_selectors(copy.deepcopy(dense), {"keep": 0.7, "scorer": "firing-rate"}).eval()
    warm_start_from_firing_rate(learned, images)
    learned.eval()
    with torch.no_grad():
        assert torch.equal(learned(images), rate(images))  # top-k of the keep score == top-k of the firing rate
    for (loc, sel), ref in zip(selectors_of(learned).items(), selectors_of(rate).values()):
        assert torch.equal(sel.last_mask, ref.last_mask), loc
    # In training, Gumbel sampling keeps each selector's conditional ratio on average (0.7 of the present tokens).
    learned.train()
    with torch.no_grad():
        learned(images)
    kept = [float(sel.last_decision.mean()) for sel in selectors_of(learned).values()]
    assert kept == pytest.approx([0.7, 0.49, 0.343], abs=0.05)


def test_selector_learning_rate_factor_follows_the_initialisation():
    from spkprune.selection import SelectionConfig

    assert SelectionConfig(scorer="learned").lr_scales() == {"token_selectors.": 0.1}
    assert SelectionConfig(scorer="learned", init="random").lr_scales() == {"token_selectors.": 1.0}
    assert SelectionConfig(scorer="learned", selector_lr_scale=3.0).lr_scales() == {"token_selectors.": 3.0}
    assert SelectionConfig(scorer="firing-rate").lr_scales() is None
    with pytest.raises(SpkpruneError, match="init: must be 'firing-rate' or 'random' \\(got 'zeros'\\)"):
        SelectionConfig(scorer="learned", init="zeros")
    with pytest.raises(SpkpruneError, match="selector_lr_scale: must be > 0"):
        SelectionConfig(scorer="learned", selector_lr_scale=0.0)


def test_training_free_scorers_evaluate_without_fine_tuning():
    from torch.utils.data import Subset

    from spkprune.data import get_dataset
    from spkprune.selection import SelectionConfig, select_tokens

    source = tiny_ticket()
    test = Subset(get_dataset("digits", "test"), range(64))
    result = select_tokens(source, SelectionConfig(keep=1.0, scorer="firing-rate"), epochs=0, test_data=test,
                           progress=False)
    # Keeping every token is the teacher itself, to the last bit.
    assert result.metrics["top1"] == result.teacher_metrics["top1"]
    assert result.metrics["loss"] == pytest.approx(result.teacher_metrics["loss"], abs=1e-6)
    assert result.history == [] and result.checkpoint.meta["selection"]["epochs"] == 0
    with pytest.raises(SpkpruneError, match="must be trained"):
        select_tokens(source, SelectionConfig(scorer="learned"), epochs=0, test_data=test, progress=False)


def test_analysis_of_cifar_style_inputs_writes_pictures_and_table(tmp_path):
    from spkprune.selection import analyze_tokens, rate_table, write_analysis

    torch.manual_seed(0)
    model = create_model("spikformer-2-384-cifar10", embed_dim=32, num_heads=2, timesteps=1)
    attach_selectors(model, {"keep": 0.7, "scorer": "firing-rate"})
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    analysis = analyze_tokens(lively(model, images), images)
    assert analysis.grid == 8 and analysis.rates[0].shape == (4, 64)
    assert analysis.rates[1].isnan().sum(1).tolist() == [20] * 4  # 64 - int(64 * 0.7) dropped before block 1
    table = rate_table(analysis)
    assert table[["block", "tokens_in", "tokens_kept"]].values.tolist() == [[1, 64, 44]]
    assert table.loc[0, "rate_kept"] > table.loc[0, "rate_dropped"] and table.loc[0, "kept_fires_more"] == 1.0
    paths = write_analysis(analysis, tmp_path, num_images=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "kept_tokens.png", "kept_vs_dropped.csv", "rate_summary.png", "token_rates.png"
    ]
    assert paths["kept_tokens"].read_bytes()[:4] == b"\x89PNG"

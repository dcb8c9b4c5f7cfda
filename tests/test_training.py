"""Training library: mask invariants after real optimiser steps, the schedule, exact resume, hooks, evaluate."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn
from torch.utils.data import Subset

from spkprune.data import get_dataset
from spkprune.errors import SpkpruneError
from spkprune.models import create_model
from spkprune.training import (
    MaskEnforcer,
    TrainConfig,
    TrainHooks,
    WarmupCosine,
    evaluate,
    fit,
    parameter_groups,
)

torch.set_num_threads(1)
PRESET = "spikformer-2-64-digits"


def _tiny_data(n_train=48, n_test=32):
    return Subset(get_dataset("digits", "train", augment=True), range(n_train)), Subset(
        get_dataset("digits", "test"), range(n_test)
    )


def _tiny_cfg(**kw):
    base = dict(epochs=2, batch_size=16, eval_batch_size=32, lr=2e-3, warmup_epochs=1, mixup_alpha=0.5, seed=3)
    return TrainConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------------------ masks
def _masked_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    masks = {"0.weight": torch.rand(5, 6) > 0.5, "2.weight": torch.rand(3, 5) > 0.3}
    return net, masks


@pytest.mark.parametrize(
    "make_opt,state_keys",
    [
        (lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.1), ("exp_avg", "exp_avg_sq")),
        (lambda p: torch.optim.AdamW(p, lr=0.1, amsgrad=True), ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), ("momentum_buffer",)),
    ],
)
def test_pruned_weights_and_optimizer_state_stay_zero(make_opt, state_keys):
    net, masks = _masked_net()
    opt = make_opt(net.parameters())
    # Optimiser state built up *before* pruning: exactly the case where momentum would regrow a weight.
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    enforcer = MaskEnforcer(net, opt, masks)
    enforcer.apply()
    params = dict(net.named_parameters())
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        enforcer.mask_gradients()
        for key, mask in masks.items():
            assert torch.count_nonzero(params[key].grad[~mask]) == 0
        opt.step()
        enforcer.apply()
        for key, mask in masks.items():
            weight = params[key]
            assert torch.count_nonzero(weight[~mask]) == 0
            for state_key in state_keys:
                assert torch.count_nonzero(opt.state[weight][state_key][~mask]) == 0
    for key, mask in masks.items():  # the kept weights did train
        assert not torch.equal(params[key][mask], before[key][mask])


def test_mask_enforcer_rejects_unknown_and_misshaped_masks():
    net, _ = _masked_net()
    with pytest.raises(SpkpruneError, match="matches no weight"):
        MaskEnforcer(net, None, {"9.weight": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(SpkpruneError, match=r"has shape \[2, 2\], its weight \[5, 6\]"):
        MaskEnforcer(net, None, {"0.weight": torch.ones(2, 2, dtype=torch.bool)})


def test_fit_keeps_masked_weights_zero_on_the_real_model():
    model = create_model(PRESET)
    key = "block.0.mlp.fc1_linear.weight"
    weight = model.state_dict()[key]
    mask = torch.rand(weight.shape, generator=torch.Generator().manual_seed(1)) > 0.8
    train, test = _tiny_data(32, 16)
    fit(model, _tiny_cfg(epochs=1), masks={key: mask}, train_data=train, test_data=test, progress=False)
    trained = model.state_dict()[key]
    assert torch.count_nonzero(trained[~mask]) == 0
    assert torch.count_nonzero(trained[mask]) == int(mask.sum())


# --------------------------------------------------------------------------------------------- schedule
def test_warmup_cosine_values():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosine(opt, lr=1.0, min_lr=0.0, warmup_lr=0.0, warmup_iters=10, decay_iters=100)
    assert sched.lr_at(0) == 0.0
    assert sched.lr_at(5) == pytest.approx(0.5)
    assert sched.lr_at(50) == pytest.approx(0.5)  # cosine half-way (timm: measured from iteration 0)
    assert sched.lr_at(25) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert sched.lr_at(100) == 0.0 and sched.lr_at(150) == 0.0
    assert sched.apply() == 0.0 and opt.param_groups[0]["lr"] == 0.0
    late = WarmupCosine(opt, lr=1.0, min_lr=0.0, warmup_lr=0.0, warmup_iters=10, decay_iters=60, offset=40)
    assert late.step_count == 40 and late.apply() == pytest.approx(sched.lr_at(40))


def test_lr_scales_multiply_the_schedule_for_matching_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Sequential(torch.nn.Linear(4, 2)))
    groups = parameter_groups(model, 0.05, {"1.": 10.0, "1.0.bias": 3.0})
    by_param = {id(p): g for g in groups for p in g["params"]}
    scales = {name: by_param[id(p)]["lr_scale"] for name, p in model.named_parameters()}
    assert scales == {"0.weight": 1.0, "0.bias": 1.0, "1.0.weight": 10.0, "1.0.bias": 3.0}  # longest prefix wins
    assert by_param[id(model[1][0].weight)]["weight_decay"] == 0.05 and by_param[id(model[1][0].bias)]["weight_decay"] == 0
    opt = torch.optim.AdamW(groups, lr=1.0)
    sched = WarmupCosine(opt, lr=0.2, min_lr=0.0, warmup_lr=0.0, warmup_iters=0, decay_iters=10)
    sched.apply()
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([0.2, 0.2, 0.6, 2.0])
    with pytest.raises(SpkpruneError, match="lr_scales: must be > 0"):
        TrainConfig(lr_scales={"1.": 0.0}).validate()


def test_parameter_groups_exempt_one_dimensional_parameters():
    model = create_model(PRESET)
    decay, no_decay = parameter_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(decay["params"]) + len(no_decay["params"]) == trainable


# ----------------------------------------------------------------------------------------------- resume
def _through_storage(tensors, info):
    """What the store does to a training state: safetensors bytes and a JSON string."""
    return st_load(st_save(tensors)), json.loads(json.dumps(info))


def test_resumed_run_is_bit_identical_to_an_uninterrupted_one():
    train, test = _tiny_data()
    cfg = _tiny_cfg()

    torch.manual_seed(0)
    straight = create_model(PRESET)
    fit(straight, cfg, train_data=train, test_data=test, progress=False)

    saved = {}

    def keep_first_epoch(state):
        if state.epoch == 1:
            saved["weights"] = {k: v.clone() for k, v in state.model.state_dict().items()}
            saved["state"] = _through_storage(*state.state_tensors())

    torch.manual_seed(0)
    first = create_model(PRESET)
    one = cfg.replace(epochs=2)
    hooks = TrainHooks(on_epoch_end=keep_first_epoch)
    # Interrupted: stop after the first epoch by raising from the hook, as a killed process would.
    hooks.on_epoch_end = lambda s: (keep_first_epoch(s), (_ for _ in ()).throw(KeyboardInterrupt) if s.epoch == 1 else None)
    with pytest.raises(KeyboardInterrupt):
        fit(first, one, hooks=hooks, train_data=train, test_data=test, progress=False)

    torch.manual_seed(123)  # the resumed process starts from unrelated global RNG state
    resumed = create_model(PRESET)
    resumed.load_state_dict(saved["weights"])
    result = fit(resumed, cfg, resume=saved["state"], train_data=train, test_data=test, progress=False)

    assert result.epochs == 2 and [h["epoch"] for h in result.history] == [1, 2]
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


# ------------------------------------------------------------------------------------------------ hooks
def test_loss_hook_replaces_the_loss_and_epoch_hook_sees_every_epoch():
    train, test = _tiny_data(32, 16)
    calls, epochs = [], []

    def loss_fn(model, images, targets, logits):
        calls.append((images.shape, targets.shape, logits.shape))
        return logits.pow(2).mean()

    hooks = TrainHooks(loss_fn=loss_fn, on_epoch_end=lambda s: epochs.append((s.epoch, s.global_step, s.metrics["lr"])))
    result = fit(create_model(PRESET), _tiny_cfg(mixup_alpha=0.0), hooks=hooks, train_data=train, test_data=test,
                 progress=False)
    assert calls == [(torch.Size([16, 1, 8, 8]), torch.Size([16]), torch.Size([16, 10]))] * 4
    assert [e[:2] for e in epochs] == [(1, 2), (2, 4)]
    assert result.global_step == 4
    # The loss hook drove training: it shrinks the logits, which the default loss would not do.
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_schedule_offset_starts_the_learning_rate_late():
    train, test = _tiny_data(32, 16)
    lrs = []
    cfg = _tiny_cfg(epochs=1, mixup_alpha=0.0, warmup_epochs=1, lr=1e-2, min_lr=0.0, warmup_lr=0.0)
    hooks = TrainHooks(on_step_end=lambda s: lrs.append(s.optimizer.param_groups[0]["lr"]))
    fit(create_model(PRESET), cfg, hooks=hooks, schedule_offset_iters=2, train_data=train, test_data=test,
        progress=False)
    # Warm-up covers iterations 0-1, so starting at 2 skips it: the cosine over 2 + 2 iterations, from step 2.
    assert lrs == pytest.approx([0.5e-2 * (1 + math.cos(math.pi * 2 / 4)), 0.5e-2 * (1 + math.cos(math.pi * 3 / 4))])


# --------------------------------------------------------------------------------------------- evaluate
def test_evaluate_reports_accuracy_loss_and_every_firing_rate():
    torch.manual_seed(0)
    model = create_model(PRESET).eval()
    nn.init.normal_(model.head.bias)  # an untrained model's logits tie; break the ties
    data = Subset(get_dataset("digits", "test"), range(40))
    metrics = evaluate(model, data, batch_size=16)
    images = torch.stack([data[i][0] for i in range(40)])
    targets = torch.tensor([data[i][1] for i in range(40)])
    with torch.no_grad():
        logits = torch.cat([model(chunk) for chunk in images.split(16)])
    assert metrics["samples"] == 40
    assert metrics["top1"] == pytest.approx((logits.argmax(1) == targets).float().mean().item())
    top5 = logits.topk(5, 1).indices.eq(targets[:, None]).any(1).float().mean().item()
    assert metrics["top5"] == pytest.approx(top5)
    assert metrics["loss"] == pytest.approx(nn.functional.cross_entropy(logits, targets).item(), rel=1e-5)
    assert set(metrics["firing"]) == set(model.neuron_sites())
    assert all(0.0 <= r <= 1.0 for r in metrics["firing"].values())
    assert any(r > 0 for r in metrics["firing"].values())


def test_train_config_round_trips_and_rejects_unknown_keys():
    cfg = TrainConfig.for_dataset("cifar10", epochs=5)
    assert cfg.lr == 5e-4 and cfg.epochs == 5 and cfg.cooldown_epochs == 10 and cfg.mixup_off_epoch == 200
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(SpkpruneError, match="unknown training option"):
        TrainConfig.from_dict({"dataset": "digits", "learning_rate": 1.0})
    with pytest.raises(SpkpruneError, match="epochs: must be >= 1"):
        TrainConfig(epochs=0).validate()

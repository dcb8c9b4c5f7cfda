"""Masks: exact counts, deterministic ties, monotone rounds, exclusions, random controls, checksums."""

from __future__ import annotations

import pytest
import torch

from spkprune.errors import SpkpruneError
from spkprune.models import create_model
from spkprune.pruning import masks as M


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(7, 13, generator=g), "b.weight": torch.randn(5, 3, 3, generator=g)}


def test_rate_reaches_target_in_exactly_n_rounds():
    rate = M.rate_for_target(0.9, 10)
    assert rate == pytest.approx(1 - 0.1 ** 0.1)
    levels = M.sparsity_schedule(10, target=0.9)
    assert levels[-1] == 0.9
    assert levels[0] == pytest.approx(rate)
    assert all(b > a for a, b in zip(levels, levels[1:]))
    assert M.sparsity_schedule(3, rate=0.25) == pytest.approx([0.25, 0.4375, 0.578125])


@pytest.mark.parametrize("target,rounds,rate", [(0.0, 3, None), (1.0, 3, None), (-0.1, 3, None), (0.5, 0, None),
                                                (None, 3, 1.5)])
def test_bad_schedules_are_user_errors(target, rounds, rate):
    with pytest.raises(SpkpruneError):
        M.sparsity_schedule(rounds, target=target, rate=rate)


def test_global_masks_prune_exact_counts_of_smallest_magnitudes():
    weights = _weights()
    masks = M.full_masks(weights, weights)
    total = sum(w.numel() for w in weights.values())  # 91 + 45 = 136
    for level in M.sparsity_schedule(4, target=0.9):
        masks = M.magnitude_masks(weights, masks, level, "global")
        assert M.count_pruned(masks) == int(total * level + 0.5)
    # what is pruned is exactly the 122 smallest |w| over both tensors
    flat = torch.cat([w.abs().flatten() for w in weights.values()])
    kept = torch.cat([m.flatten() for m in masks.values()])
    assert M.count_pruned(masks) == 122
    assert flat[~kept].max() < flat[kept].min()


def test_layerwise_masks_prune_each_tensor_by_its_own_count():
    weights = _weights(1)
    masks = M.magnitude_masks(weights, M.full_masks(weights, weights), 0.5, "layerwise")
    assert int((~masks["a.weight"]).sum()) == 46  # round(91 * 0.5) half up
    assert int((~masks["b.weight"]).sum()) == 23  # round(45 * 0.5)
    for key, w in weights.items():
        assert w.abs()[~masks[key]].max() < w.abs()[masks[key]].min()


def test_ties_are_broken_by_position_and_counts_stay_exact():
    weights = {"w.weight": torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 1.0, 1.0]])}
    masks = M.magnitude_masks(weights, M.full_masks(weights, weights), 0.5, "global")
    assert masks["w.weight"].tolist() == [[False, False, False, False], [True, True, True, True]]


def test_masks_only_shrink_even_when_pruned_weights_grow_back_in_value():
    weights = _weights(2)
    first = M.magnitude_masks(weights, M.full_masks(weights, weights), 0.3, "global")
    regrown = {k: torch.where(first[k], w, torch.full_like(w, 100.0)) for k, w in weights.items()}
    second = M.magnitude_masks(regrown, first, 0.5, "global")
    for key in weights:
        assert not (second[key] & ~first[key]).any()
    assert M.count_pruned(second) == int(136 * 0.5 + 0.5)
    with pytest.raises(ValueError):
        M.magnitude_masks(weights, second, 0.3, "global")


def test_random_masks_keep_per_tensor_counts_and_differ_from_magnitude():
    weights = _weights(3)
    masks = M.magnitude_masks(weights, M.full_masks(weights, weights), 0.6, "global")
    rand = M.random_masks_like(masks, seed=7)
    assert list(rand) == list(masks)
    for key in masks:
        assert int((~rand[key]).sum()) == int((~masks[key]).sum())
    assert M.mask_checksum(rand) != M.mask_checksum(masks)
    assert M.mask_checksum(M.random_masks_like(masks, seed=7)) == M.mask_checksum(rand)


def test_checksum_depends_on_bits_and_keys_and_is_the_export_checksum():
    from spkprune.checkpoint import mask_sha256

    a = {"x": torch.tensor([True, False, True, True])}
    assert M.mask_checksum(a) == M.mask_checksum({"x": a["x"].clone()})
    assert M.mask_checksum(a) != M.mask_checksum({"x": torch.tensor([True, True, False, True])})
    assert M.mask_checksum(a) != M.mask_checksum({"y": a["x"]})
    # one definition: the bytes exported files record (shapes are checked beside it, by mask_mismatch)
    assert M.mask_checksum(a) == mask_sha256(a) == M.mask_checksum({"x": a["x"].view(2, 2)})


def test_eligible_keys_excludes_by_glob_and_rejects_patterns_matching_nothing():
    keys = list(create_model("spikformer-2-64-digits").prunable_weights())
    assert "patch_embed.proj_conv.weight" in keys and "head.weight" in keys
    assert not any(k.endswith("bias") or "bn" in k for k in keys)
    kept = M.eligible_keys(keys, ["head.weight", "patch_embed.proj_conv.*"])
    assert kept == [k for k in keys if k not in ("head.weight", "patch_embed.proj_conv.weight")]
    with pytest.raises(SpkpruneError, match="'nothing\\*' match no prunable weight"):
        M.eligible_keys(keys, ["head.weight", "nothing*"])
    with pytest.raises(SpkpruneError, match="removes every prunable weight"):
        M.eligible_keys(keys, ["*"])


def test_apply_masks_zeroes_exactly_the_pruned_entries():
    weights = _weights(4)
    masks = M.magnitude_masks(weights, M.full_masks(weights, weights), 0.5, "layerwise")
    out = M.apply_masks(weights, masks)
    for key in weights:
        assert torch.equal(out[key][masks[key]], weights[key][masks[key]])
        assert (out[key][~masks[key]] == 0).all()

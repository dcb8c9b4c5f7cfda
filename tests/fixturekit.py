"""Reading the reference fixtures in tests/fixtures/<name>/ (made by running each family's original code)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent / "fixtures"


def golden_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The original model's state_dict in `folder`'s golden_small.safetensors (without `__input__` and the like)."""
    return {k: v for k, v in load_file(folder / "golden_small.safetensors").items() if not k.startswith("__")}


def fixture_keys(folder: Path) -> list[tuple[str, list[int]]]:
    """Every state_dict key with its shape, in the original order (`folder`/keys.txt)."""
    rows = []
    for line in (folder / "keys.txt").read_text().splitlines():
        key, shape = line.split(" ", 1)
        rows.append((key, [int(d) for d in shape.strip("[]").split(",") if d.strip()]))
    return rows


def run_recording_spikes(model, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The logits of `model(images)` and the output spikes of every neuron site (uint8), recording switched off
    again afterwards."""
    sites = model.neuron_sites()
    for site in sites.values():
        site.record = True
    try:
        with torch.no_grad():
            logits = model(images)
    finally:
        for site in sites.values():
            site.record = False
    return logits, {name: site.last_spikes.to(torch.uint8) for name, site in sites.items()}


def expected_spikes(folder: Path) -> dict[str, torch.Tensor]:
    """Every neuron site's spikes the original code produced on the fixture input, by site."""
    activations = load_file(folder / "golden_small_activations.safetensors")
    return {k.removeprefix("__spikes__."): v for k, v in activations.items() if k.startswith("__spikes__.")}


def check_calls_are_independent(model, images: torch.Tensor) -> None:
    """A model call resets every neuron first: the same input gives the same logits before and after another."""
    with torch.no_grad():
        first, second = model(images), model(images)
        other = model(torch.rand_like(images))
        third = model(images)
    assert torch.equal(first, second) and torch.equal(first, third)
    assert not torch.equal(first, other)

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

"""Training state (optimiser, schedule, AMP scaler, RNG) as a flat tensor dict plus a JSON-able dict, so that it can
be stored beside the weights in a safetensors blob and a resumed run continues bit-exactly."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

OPTIM_PREFIX = "__optim__."
RNG_PREFIX = "__rng__."


def flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors of the optimiser state under `__optim__.<param index>.<key>`; the rest (param_groups) as JSON."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{OPTIM_PREFIX}{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], info: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith(OPTIM_PREFIX):
            index, key = name[len(OPTIM_PREFIX) :].split(".", 1)
            state.setdefault(int(index), {})[key] = value
    for index, entry in info["scalars"].items():
        state.setdefault(int(index), {}).update(entry)
    return {"state": state, "param_groups": info["param_groups"]}


def capture_rng(loader_generator: torch.Generator | None) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {f"{RNG_PREFIX}torch": torch.get_rng_state()}
    if loader_generator is not None:
        tensors[f"{RNG_PREFIX}loader"] = loader_generator.get_state()
    if torch.cuda.is_available():
        for i, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"{RNG_PREFIX}cuda.{i}"] = cuda_state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors[f"{RNG_PREFIX}numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, py_state, gauss = random.getstate()
    info = {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [version, list(py_state), gauss]}
    return tensors, info


def restore_rng(tensors: dict[str, torch.Tensor], info: dict, loader_generator: torch.Generator | None) -> None:
    torch.set_rng_state(tensors[f"{RNG_PREFIX}torch"])
    if loader_generator is not None and f"{RNG_PREFIX}loader" in tensors:
        loader_generator.set_state(tensors[f"{RNG_PREFIX}loader"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith(f"{RNG_PREFIX}cuda.")]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    kind, pos, has_gauss, cached = info["numpy"]
    keys = tensors[f"{RNG_PREFIX}numpy"].numpy().astype(np.uint32)
    np.random.set_state((kind, keys, int(pos), int(has_gauss), float(cached)))
    version, py_state, gauss = info["python"]
    random.setstate((version, tuple(py_state), gauss))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

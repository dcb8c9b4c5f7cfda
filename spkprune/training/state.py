"""The one resumable training state: what a run needs to continue bit-exactly after some epoch.

`fit` gives it as a pair (flat tensors, JSON-able info): optimiser, schedule, AMP scaler and RNG
(`TrainState.state_tensors()`), and takes it back with `fit(resume=...)`. In the store it is one safetensors blob of
kind `train-state`: the weights under their state_dict keys, the masks under `__mask__.<key>`, the optimiser under
`__optim__.*`, the RNG under `__rng__.*`, and `__metadata__ = {"format": STATE_FORMAT, "state": json.dumps(info)}`.
The training runner (`NAME@train-state`) and IMP (`NAME@round-K-epoch-E`) both write and read it here.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from spkprune.checkpoint import MASK_PREFIX
from spkprune.errors import SpkpruneError
from spkprune.store import Artifact, Store

STATE_FORMAT = "spkprune.train-state/2"
STATE_KIND = "train-state"
OPTIM_PREFIX = "__optim__."
RNG_PREFIX = "__rng__."

# What earlier versions wrote, still read so that their interrupted runs resume: fit's info, the runner's blob
# (optimiser and RNG only; the weights in the checkpoint its meta "weights" names, the info in the header) and
# IMP's blob (weights and masks too; the info in the index meta "state", kind `imp-state`).
_INFO_FORMAT_V1 = "spkprune.train-state/1"
_RUNNER_FORMAT_V1 = "spkprune.train-state"
_IMP_FORMAT_V1 = "spkprune.imp-state"
_IMP_KIND_V1 = "imp-state"
STATE_KINDS = (STATE_KIND, _IMP_KIND_V1)


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


def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict, detached and copied to the CPU."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def check_resumable(info: dict) -> None:
    """SpkpruneError unless `info` is the JSON half of a training state (this format or an earlier one)."""
    if info.get("format") not in (STATE_FORMAT, _INFO_FORMAT_V1):
        raise SpkpruneError(f"training state has format {info.get('format')!r}, expected {STATE_FORMAT}")


@dataclass
class SavedState:
    """A training state read back: the weights and masks after `epoch`, and what `fit(resume=...)` takes."""

    weights: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    resume: tuple[dict[str, torch.Tensor], dict]

    @property
    def epoch(self) -> int:
        return int(self.resume[1]["epoch"])


def save_train_state(
    store: Store,
    name: str,
    tag: str,
    *,
    weights: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    resume: tuple[dict[str, torch.Tensor], dict],
    meta: dict,
    parent: str | None,
) -> Artifact:
    """Write NAME@TAG (replacing it): `weights`, `masks` and `resume` (a `TrainState.state_tensors()` pair)."""
    tensors, info = resume
    blob = {**weights, **{MASK_PREFIX + key: mask for key, mask in masks.items()}, **tensors}
    header = {"format": STATE_FORMAT, "state": json.dumps(info)}
    return store.put(name, tag, blob, header, meta, kind=STATE_KIND, parent=parent, replace=True)


def load_train_state(store: Store, art: Artifact) -> SavedState:
    """Read a training state written by `save_train_state` or by an earlier version of spkprune."""
    tensors, header = store.read(art)
    fmt = header.get("format")
    if fmt == STATE_FORMAT:
        info = json.loads(header["state"])
    elif fmt == _IMP_FORMAT_V1:
        info = art.meta["state"]
    elif fmt == _RUNNER_FORMAT_V1:
        info = json.loads(header["state"])
        weights, _ = store.read(store.resolve(art.meta["weights"]))
        tensors = {**weights, **tensors}
    else:
        raise SpkpruneError(f"{art.ref} is not a training state; delete it and train again")
    state = {k: v for k, v in tensors.items() if k.startswith((OPTIM_PREFIX, RNG_PREFIX))}
    masks = {k[len(MASK_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MASK_PREFIX)}
    weights = {k: v for k, v in tensors.items() if not k.startswith((MASK_PREFIX, OPTIM_PREFIX, RNG_PREFIX))}
    return SavedState(weights, masks, (state, info))

"""Where a lottery run starts and what it goes back to: the trained source checkpoint and its rewind point.

`init` rewinds to NAME@init, `epoch:K` to NAME@epoch-K and `iter:K` to NAME@iter-K of the source's training run (or
of its nearest ancestor that has them). Late rewinding continues the dense run's learning-rate schedule from there.
`none` rewinds nothing: each round continues from the weights the round before ended with.

The source may be pruned already (a ticket of another run, e.g. structured before unstructured): its masks stay, and
only shrink in the rounds that follow.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from spkprune.checkpoint import Checkpoint, build_model, load_artifact
from spkprune.data import get_dataset, make_loader
from spkprune.errors import SpkpruneError
from spkprune.models.structure_sites import check_kinds
from spkprune.pruning import masks as M
from spkprune.pruning.settings import ImpSettings, parse_rewind
from spkprune.pruning.structures import KINDS, Group, structure_groups
from spkprune.store import Artifact, Store, is_store_ref
from spkprune.training import TrainConfig


@dataclass
class Source:
    """The trained dense checkpoint a lottery run prunes, with its training configuration."""

    art: Artifact
    ckpt: Checkpoint
    train: TrainConfig
    prunable: list[str]
    eligible: list[str]
    timesteps: int
    structures: list[Group]  # every removable structure of the architecture (structures.py)

    def model(self, state_dict: dict[str, torch.Tensor], timesteps: int) -> nn.Module:
        """The source's architecture (and selector) at `timesteps` time steps, holding `state_dict`."""
        meta = dict(self.ckpt.meta)
        meta["config"] = {**meta["config"], "timesteps": timesteps}
        return build_model(Checkpoint(state_dict, {}, meta, self.art.ref))

    def complete(self, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`masks` with an all-True mask for every eligible weight they leave out (nothing pruned there yet)."""
        return {**M.full_masks(self.ckpt.state_dict, self.eligible), **masks}

    @property
    def base_masks(self) -> dict[str, torch.Tensor]:
        """The source's own masks over every eligible weight (all True for a dense source)."""
        return self.complete(self.ckpt.masks)


def load_source(store: Store, ref: str, settings: ImpSettings) -> Source:
    if not is_store_ref(ref):
        raise SpkpruneError(
            f"imp needs a store reference NAME[@TAG] (it rewinds to NAME@init), got {ref!r}; "
            "bring the checkpoint in with `spkprune import` or `spkprune train` first"
        )
    art = store.resolve(ref)
    ckpt = load_artifact(store, art)
    if not ckpt.meta.get("train"):
        raise SpkpruneError(
            f"{art.ref} has no training configuration (meta 'train'; e.g. an imported checkpoint); imp rewinds to "
            f"{art.name}@init and retrains with the recorded configuration: train it with `spkprune train` first"
        )
    train = TrainConfig.from_dict(ckpt.meta["train"])
    model = build_model(ckpt)
    if settings.granularity == "channel" and tuple(settings.structures) != KINDS:  # all kinds: those it has
        check_kinds(model, settings.structures)
    prunable = list(model.prunable_weights())
    eligible = M.eligible_keys(prunable, settings.exclude)
    return Source(art, ckpt, train, prunable, eligible, model.config.timesteps, structure_groups(model))


@dataclass
class RewindPoint:
    label: str  # the artifact rewound to ("none": each round continues from the round before)
    state_dict: dict[str, torch.Tensor] | None  # None for `none`
    offset_iters: int  # where the learning-rate schedule of a round starts

    @property
    def continues(self) -> bool:
        return self.state_dict is None


def resolve_rewind(store: Store, src: Source, spec: str) -> RewindPoint:
    """The weights (and schedule offset) that `--rewind spec` names; SpkpruneError naming the tags that exist."""
    kind, k = parse_rewind(spec)
    if kind == "none":
        return RewindPoint("none", None, 0)
    name = src.art.name
    tag = {"init": "init", "epoch": f"epoch-{k}", "iter": f"iter-{k}"}[kind]
    if kind == "epoch" and k > src.train.total_epochs:
        raise SpkpruneError(f"--rewind {spec}: {name} trained for only {src.train.total_epochs} epochs")
    art = _rewind_artifact(store, src, tag)
    if art is None:
        what = {"init": "the initial weights", "epoch": f"the weights after epoch {k}", "iter": f"iteration {k}"}
        hint = "" if kind == "iter" else "; re-train it with `spkprune train` (which keeps them)"
        raise SpkpruneError(
            f"rewind point {name}@{tag} ({what[kind]}) does not exist in the store{hint}; tags of {name}: "
            f"{', '.join(store.tags(name))}"
        )
    state = _rewound_state(src, load_artifact(store, art))
    offset = 0
    if kind == "epoch":  # the training run records its exact step count (batch limits included)
        offset = int(art.meta.get("step") or k * _iters_per_epoch(src.train, src.timesteps))
    elif kind == "iter":
        offset = k
    return RewindPoint(art.ref, state, offset)


def _rewind_artifact(store: Store, src: Source, tag: str) -> Artifact | None:
    """NAME@TAG of the source, else of its nearest ancestor that has it: a checkpoint fine-tuned from a trained model
    (e.g. with a token selector) rewinds to the weights of the training run it came from."""
    ancestors, _ = store.lineage(src.art)
    for art in [src.art, *ancestors]:
        found = store.get(art.name, tag)
        if found is not None:
            return found
    return None


def _rewound_state(src: Source, point: Checkpoint) -> dict[str, torch.Tensor]:
    """Every weight of the model from the rewind point, except a token selector added after it: that keeps its
    trained weights (it is neither rewound nor pruned)."""
    model_keys = list(src.model(src.ckpt.state_dict, src.timesteps).state_dict())
    selector_keys = [key for key in model_keys if key.startswith("token_selectors.") and key not in point.state_dict]
    state = {key: point.state_dict[key] for key in model_keys if key in point.state_dict}
    state.update({key: src.ckpt.state_dict[key] for key in selector_keys})
    missing = [key for key in model_keys if key not in state]
    if missing:
        raise SpkpruneError(f"rewind point {point.ref} lacks weights of the model: {', '.join(missing[:3])}")
    return state


def _iters_per_epoch(cfg: TrainConfig, timesteps: int) -> int:
    data = get_dataset(cfg.dataset, "train", cfg.data_dir, timesteps=timesteps, augment=False)
    return len(make_loader(data, cfg.batch_size, train=True, seed=cfg.seed))

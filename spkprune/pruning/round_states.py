"""The training state of a round still in progress, so that a killed IMP run continues from its last finished epoch.

After every epoch but the last, round `NAME@TAG` saves `NAME@TAG-epoch-E` in the one training-state format
(`spkprune.training.state`: weights, masks, optimiser, schedule, RNG) and drops the one before; all are removed once
the round's own artifact exists.
"""

from __future__ import annotations

import torch

from spkprune.errors import SpkpruneError
from spkprune.pruning import masks as M
from spkprune.store import Artifact, Store
from spkprune.training import TrainState, distributed
from spkprune.training.state import STATE_KINDS, SavedState, load_train_state, save_train_state, weights_of


class RoundStates:
    """The per-epoch states of round NAME@TAG; `meta` (the run's settings, kind, round) is stored with each."""

    def __init__(self, store: Store, name: str, round_tag: str, meta: dict):
        self.store, self.name, self.meta = store, name, meta
        self.prefix = f"{round_tag}-epoch-"

    def save(self, state: TrainState, masks: dict[str, torch.Tensor], parent: str) -> None:
        """The round's `on_epoch_end` hook."""
        if state.epoch >= state.cfg.total_epochs:
            return  # the round artifact follows at once
        if distributed.is_main():
            tag = f"{self.prefix}{state.epoch}"
            save_train_state(
                self.store, self.name, tag, weights=weights_of(state.model), masks=masks,
                resume=state.state_tensors(), meta={"imp": {**self.meta, "epoch": state.epoch}}, parent=parent,
            )
            for old in self.saved():
                if old.tag != tag:
                    self.store.delete(old.name, old.tag)
        distributed.barrier()

    def saved(self) -> list[Artifact]:
        """The round's states, oldest first."""
        states = [a for a in self.store.list(self.name) if a.tag.startswith(self.prefix) and a.kind in STATE_KINDS]
        return sorted(states, key=lambda a: int(a.tag[len(self.prefix) :]))

    def latest(self, masks: dict[str, torch.Tensor]) -> SavedState | None:
        """The round's last saved state, which must hold `masks`; None when there is none."""
        states = self.saved()
        if not states:
            return None
        saved = load_train_state(self.store, states[-1])
        if M.mask_checksum(saved.masks) != M.mask_checksum(masks):
            raise SpkpruneError(
                f"{states[-1].ref} was saved with other masks than this run computes; remove it and re-run"
            )
        return saved

    def drop(self) -> None:
        if distributed.is_main():
            for art in self.saved():
                self.store.delete(art.name, art.tag)
        distributed.barrier()

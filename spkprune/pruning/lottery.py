"""One lottery run NAME in the store: its artifacts' names, its identity, and what each round is made of.

Round k of the ticket prunes round k-1's trained weights (`granularity.py`: single weights by magnitude, or whole
structures by importance) and rewinds the survivors; a control reuses the ticket's round k (`random-reinit`: the same
masks on a fresh initialisation; `random-prune`: random masks with the same per-tensor counts, or random structures
with the same per-layer counts, on the rewind weights). Rounds are saved as `NAME@round-K` and `NAME@<control>-round-K`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable

import torch
from torch import nn

from spkprune.checkpoint import Checkpoint, load_artifact, save_checkpoint, sparsity_report
from spkprune.errors import SpkpruneError
from spkprune.models import model_from_config
from spkprune.models.families import family_of_meta, require
from spkprune.models.selector import attach_selectors, selector_config
from spkprune.pruning import masks as M
from spkprune.pruning.granularity import pruning_strategy
from spkprune.pruning.report import RoundRow
from spkprune.pruning.rewind import Source, resolve_rewind
from spkprune.pruning.round_states import RoundStates
from spkprune.pruning.settings import CONTROLS, ImpSettings
from spkprune.pruning.sharing import share_masks
from spkprune.store import Store, format_ref
from spkprune.training import TrainConfig, distributed
from spkprune.training.state import weights_of

Log = Callable[[str], None]


class Lottery:
    """The rounds of IMP run `name` of source `src`: what they are called, and their masks, models and settings."""

    def __init__(self, store: Store, src: Source, name: str, settings: ImpSettings, progress: bool, log: Log):
        self.store, self.src, self.name, self.settings = store, src, name, settings
        self.progress, self.log = progress, log
        self.seed = settings.seed if settings.seed is not None else src.train.seed
        self.levels = settings.levels()
        source = {"source": src.art.ref, "source_sha256": src.art.sha256}
        self.identity = {**settings.to_dict(), "seed": self.seed, **source}
        self.rewind = resolve_rewind(store, src, settings.rewind)
        if settings.granularity == "channel":
            require(family_of_meta(src.ckpt.meta), "channel_structures", "imp --granularity channel")
        self.pruning = pruning_strategy(settings, src.structures, src.eligible, store, src.art)
        self.identity.update(self.pruning.identity())
        self.pruning.check(src.base_masks, self.levels)  # a level it cannot reach is refused before any work

    # ---- naming ----------------------------------------------------------------------------------------------
    @staticmethod
    def tag(kind: str, k: int) -> str:
        return f"round-{k}" if kind == "ticket" else f"{kind}-round-{k}"

    def ref(self, kind: str, k: int) -> str:
        return format_ref(self.name, self.tag(kind, k))

    def parent(self, kind: str, k: int) -> str:
        """A ticket round descends from the round before it, a control round from the ticket round it copies."""
        return self.ref("ticket", k - 1 if kind == "ticket" else k)

    def done(self, kind: str, k: int) -> bool:
        return self.store.exists(self.name, self.tag(kind, k))

    def rounds(self, kind: str) -> range:
        return range(0 if kind == "ticket" else 1, self.settings.rounds + 1)

    def pending(self, control: str) -> list[tuple[str, int]]:
        """The rounds 1..N of the ticket, then of `control`, that the store does not hold yet."""
        kinds = ["ticket"] + ([control] if control != "none" else [])
        return [(kind, k) for kind in kinds for k in self.rounds(kind) if k > 0 and not self.done(kind, k)]

    def present_kinds(self) -> list[str]:
        """The ticket, then every control that has all its rounds in the store."""
        controls = [c for c in CONTROLS[1:] if all(self.done(c, k) for k in self.rounds(c))]
        return ["ticket", *controls]

    def row(self, kind: str, k: int) -> RoundRow:
        return RoundRow.of(self.store.resolve(self.ref(kind, k)), kind, k)

    def states(self, kind: str, k: int) -> RoundStates:
        """The per-epoch training states of round k of `kind` while it trains."""
        meta = {"settings": self.identity, "kind": kind, "round": k}
        return RoundStates(self.store, self.name, self.tag(kind, k), meta)

    # ---- identity -------------------------------------------------------------------------------------------
    def check_name_free_or_same(self) -> None:
        tags = self.store.tags(self.name)
        if not tags:
            return
        first = self.store.get(self.name, "round-0")
        if first is None:
            raise SpkpruneError(
                f"name {self.name!r} is already used in the store (tags: {', '.join(tags[:6])}); choose another --name"
            )
        stored = first.meta.get("imp", {}).get("settings", {})
        diff = sorted(k for k in set(stored) | set(self.identity) if stored.get(k) != self.identity.get(k))
        if diff:
            shown = "; ".join(f"{k}: stored {stored.get(k)!r}, now {self.identity.get(k)!r}" for k in diff[:4])
            raise SpkpruneError(
                f"{self.name} already holds an IMP run with other settings ({shown}); re-run it with the same "
                "options, or choose another --name"
            )

    # ---- what a round is made of ----------------------------------------------------------------------------
    def timesteps(self, k: int) -> int:
        """Rounds before the last search at `--search-timesteps` T' (early-time tickets); the last trains at T."""
        search = self.settings.search_timesteps
        return search if search is not None and k < self.settings.rounds else self.src.timesteps

    @property
    def retrains(self) -> bool:
        """Whether a round trains: always in IMP, with `--finetune-epochs` in a one-shot run."""
        return not self.settings.one_shot or self.settings.finetune_epochs > 0

    def round_config(self, k: int) -> TrainConfig:
        dense = self.src.train
        epochs = self.settings.finetune_epochs if self.settings.one_shot else self.settings.epochs_per_round
        epochs = epochs or dense.epochs
        cooldown = dense.cooldown_epochs if epochs == dense.epochs else 0
        mixup_off = dense.mixup_off_epoch if epochs == dense.epochs else None
        return dataclasses.replace(
            dense, epochs=epochs, cooldown_epochs=cooldown, warmup_epochs=min(dense.warmup_epochs, epochs),
            mixup_off_epoch=mixup_off, seed=self.seed + k, eval_every=0,
        ).validate()

    def masks(self, kind: str, k: int) -> dict[str, torch.Tensor]:
        """Round k's masks, the same on every process: the ticket's by magnitude, a control's from the ticket's."""
        if kind == "ticket":
            return self._ticket_masks(k)
        masks = self._round(k).masks
        if kind == "random-prune":
            masks = self.pruning.random_like(self.src.base_masks, masks, _derive_seed(self.seed, kind, k))
        return share_masks(masks if distributed.is_main() else None, masks)

    def _ticket_masks(self, k: int) -> dict[str, torch.Tensor]:
        """Computed on the main process from round k-1's trained weights, then shared."""
        prev = self._round(k - 1)
        prev_masks = self.src.complete(prev.masks)
        new = None
        if distributed.is_main():
            new = self.pruning.prune(prev.state_dict, prev_masks, self.levels[k - 1])
        return share_masks(new, prev_masks)

    def _round(self, k: int) -> Checkpoint:
        return load_artifact(self.store, self.store.resolve(self.ref("ticket", k)))

    def rewound_model(self, kind: str, k: int) -> nn.Module:
        """Round k's starting model: the rewind point's weights (with `--rewind none` the weights the ticket's round
        k-1 ended with), or a fresh initialisation for `random-reinit`."""
        if kind == "random-reinit":
            return self.fresh_model(self.timesteps(k), _derive_seed(self.seed, kind, k))
        return self.src.model(self.start_weights(k), self.timesteps(k))

    def start_weights(self, k: int) -> dict[str, torch.Tensor]:
        return self._round(k - 1).state_dict if self.rewind.continues else self.rewind.state_dict

    def started_from(self, k: int) -> str:
        """The artifact whose weights round k started from (meta["imp"]["rewind"])."""
        return self.ref("ticket", k - 1) if self.rewind.continues else self.rewind.label

    def fresh_model(self, timesteps: int, seed: int) -> nn.Module:
        """A newly initialised model of the same architecture (and selector), from a seed of its own."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.src.model(self.src.ckpt.state_dict, timesteps)
            fresh = _reinitialised(model)
        return fresh

    # ---- the round artifacts --------------------------------------------------------------------------------
    def save_round_zero(self, model: nn.Module, metrics: dict) -> None:
        """Round 0 is the source itself, evaluated again at its full T."""
        src = self.src
        self._save("ticket", 0, model, src.ckpt.masks, metrics, src.train, parent=src.art.ref,
                   timesteps=src.timesteps)

    def save_round(self, kind: str, k: int, model: nn.Module, masks, metrics: dict, cfg: TrainConfig) -> None:
        """Round k of `kind`, trained; its per-epoch states go once it is stored."""
        self._save(
            kind, k, model, masks, metrics, cfg, parent=self.parent(kind, k), timesteps=self.timesteps(k),
            rewind=self.started_from(k),
        )
        self.states(kind, k).drop()

    def _save(self, kind, k, model, masks, metrics, cfg, *, parent, timesteps, rewind=None) -> None:
        """NAME@<round k of kind>: weights, masks, metrics, sparsity and the run's settings (main process)."""
        if distributed.is_main():
            state_dict = weights_of(model)
            _check_pruned_zero(state_dict, masks, self.ref(kind, k))
            meta = {
                key: self.src.ckpt.meta.get(key) for key in ("arch", "config", "selector") if key in self.src.ckpt.meta
            }
            meta.update(
                train=cfg.to_dict(),
                seed=cfg.seed,
                metrics={key: metrics[key] for key in ("top1", "top5", "loss") if key in metrics},
                sparsity=sparsity_report(state_dict, masks, self.src.prunable),
                imp={
                    "settings": self.identity, "kind": kind, "round": k, "timesteps": timesteps,
                    "level": self.levels[k - 1] if k else 0.0, "rewind": rewind, "mask_sha256": M.mask_checksum(masks),
                    **self.pruning.describe(masks),
                },
            )
            save_checkpoint(self.store, self.name, self.tag(kind, k), Checkpoint(state_dict, masks, meta), parent=parent)
        distributed.barrier()


def _check_pruned_zero(state_dict: dict[str, torch.Tensor], masks, where: str) -> None:
    """The invariant training must keep: every pruned weight is exactly zero (never silently re-applied here)."""
    for key, mask in masks.items():
        regrown = int(state_dict[key].masked_select(~mask).ne(0).sum())
        if regrown:
            raise RuntimeError(f"{where}: {regrown} pruned weights of {key} are non-zero after training")


def _reinitialised(model: nn.Module) -> nn.Module:
    """The same architecture with fresh parameters: a new Spikformer from its config (+ the same selector config)."""
    fresh = model_from_config(model.config, preset=model.preset)
    if len(model.token_selectors):
        attach_selectors(fresh, selector_config(model))
    return fresh


def _derive_seed(seed: int, what: str, k: int) -> int:
    digest = hashlib.sha256(f"{seed}/{what}/{k}".encode()).hexdigest()
    return int(digest[:8], 16) % (2**31)

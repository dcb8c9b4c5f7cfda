"""Iterative magnitude pruning (the lottery-ticket procedure), after open_lth's `lottery/` levels.

What is pruned (`masks.py`: the strategy), how it trains (`spkprune.training.fit`) and the rounds (here) are separate.
Every round is a store artifact `NAME@round-K` (weights + masks + metadata); a finished round is never recomputed,
and an unfinished one continues from its last saved epoch (`NAME@round-K-epoch-E`, removed when the round ends):

    round 0   the given trained checkpoint (evaluated at full T)
    round k   prune `levels[k]` of the eligible weights by magnitude of round k-1's trained weights,
              rewind the survivors (`init`, `epoch:K`, `iter:K`), retrain `epochs_per_round` epochs

Controls (`random-reinit`: round k's masks on a fresh initialisation; `random-prune`: random masks with round k's
per-tensor counts on the rewind weights) are stored as `NAME@<control>-round-K` beside the ticket.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from spkprune.checkpoint import Checkpoint, build_model, load_artifact, save_checkpoint, sparsity_report
from spkprune.errors import SpkpruneError
from spkprune.pruning import masks as M
from spkprune.pruning.settings import ImpSettings, parse_rewind
from spkprune.store import Artifact, Store, format_ref, is_store_ref, parse_ref
from spkprune.training import TrainConfig, TrainHooks, evaluate, fit
from spkprune.training import distributed

CONTROLS = ("none", "random-reinit", "random-prune")
STATE_FORMAT = "spkprune.imp-state"
STATE_KIND = "imp-state"
_MASK = "__mask__."
_STATE_PREFIXES = ("__optim__.", "__rng__.")

Log = Callable[[str], None]


# ----------------------------------------------------------------------------------------------- results
@dataclass
class RoundRow:
    round: int
    kind: str  # "ticket" or a control
    ref: str
    sparsity_prunable: float
    sparsity_total: float
    remaining_prunable: int
    remaining_total: int
    top1: float
    top5: float
    loss: float
    timesteps: int
    mask_sha256: str


@dataclass
class ImpReport:
    name: str
    rows: list[RoundRow]
    nothing_to_do: bool
    plot: Path | None = None
    settings: dict = field(default_factory=dict)

    def frame(self):
        """One row per round and kind, with the change in top-1 against round 0."""
        import pandas as pd

        base = next((r.top1 for r in self.rows if r.round == 0), None)
        records = []
        for row in self.rows:
            rec = dataclasses.asdict(row)
            rec["delta_top1"] = None if base is None else row.top1 - base
            records.append(rec)
        cols = [
            "round", "kind", "sparsity_prunable", "sparsity_total", "remaining_prunable", "remaining_total",
            "top1", "delta_top1", "top5", "loss", "timesteps", "ref",
        ]
        return pd.DataFrame.from_records(records, columns=cols)


# ----------------------------------------------------------------------------------------- the source run
@dataclass
class _Source:
    art: Artifact
    ckpt: Checkpoint
    train: TrainConfig
    prunable: list[str]
    eligible: list[str]
    timesteps: int


def _load_source(store: Store, ref: str, settings: ImpSettings) -> _Source:
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
    if ckpt.masks:
        raise SpkpruneError(f"{art.ref} is already pruned; start imp from a dense trained checkpoint")
    train = TrainConfig.from_dict(ckpt.meta["train"])
    model = build_model(ckpt)
    prunable = list(model.prunable_weights())
    eligible = M.eligible_keys(prunable, settings.exclude)
    return _Source(art, ckpt, train, prunable, eligible, model.config.timesteps)


@dataclass
class _Rewind:
    label: str
    state_dict: dict[str, torch.Tensor]
    offset_iters: int


def _iters_per_epoch(cfg: TrainConfig, timesteps: int) -> int:
    from spkprune.data import get_dataset, make_loader

    data = get_dataset(cfg.dataset, "train", cfg.data_dir, timesteps=timesteps, augment=False)
    return len(make_loader(data, cfg.batch_size, train=True, seed=cfg.seed))


def _rewind_artifact(store: Store, src: _Source, tag: str) -> Artifact | None:
    """NAME@TAG of the source, else of its nearest ancestor that has it: a checkpoint fine-tuned from a trained model
    (e.g. with a token selector) rewinds to the weights of the training run it came from."""
    ancestors, _ = store.lineage(src.art)
    for art in [src.art, *ancestors]:
        found = store.get(art.name, tag)
        if found is not None:
            return found
    return None


def _resolve_rewind(store: Store, src: _Source, spec: str, model_keys: list[str]) -> _Rewind:
    kind, k = parse_rewind(spec)
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
    ckpt = load_artifact(store, art)
    # A token selector added after the rewind point is not rewound (nor pruned): it keeps its trained weights.
    selector_keys = [key for key in model_keys if key.startswith("token_selectors.") and key not in ckpt.state_dict]
    state = {key: ckpt.state_dict[key] for key in model_keys if key in ckpt.state_dict}
    state.update({key: src.ckpt.state_dict[key] for key in selector_keys})
    missing = [key for key in model_keys if key not in state]
    if missing:
        raise SpkpruneError(f"rewind point {art.ref} lacks weights of the model: {', '.join(missing[:3])}")
    offset = 0
    if kind == "epoch":  # the training run records its exact step count (batch limits included)
        offset = int(art.meta.get("step") or k * _iters_per_epoch(src.train, src.timesteps))
    elif kind == "iter":
        offset = k
    return _Rewind(art.ref, state, offset)


# ---------------------------------------------------------------------------------------------- the driver
class _Run:
    def __init__(self, store: Store, src: _Source, name: str, settings: ImpSettings, progress: bool, log: Log):
        self.store, self.src, self.name, self.settings = store, src, name, settings
        self.progress, self.log = progress, log
        self.seed = settings.seed if settings.seed is not None else src.train.seed
        self.levels = settings.levels()
        self.dist = distributed.current()
        self.identity = {**settings.to_dict(), "seed": self.seed, "source": src.art.ref, "source_sha256": src.art.sha256}

    # ---- naming ----------------------------------------------------------------------------------------------
    @staticmethod
    def tag(kind: str, k: int) -> str:
        return f"round-{k}" if kind == "ticket" else f"{kind}-round-{k}"

    def ref(self, kind: str, k: int) -> str:
        return format_ref(self.name, self.tag(kind, k))

    def done(self, kind: str, k: int) -> bool:
        return self.store.exists(self.name, self.tag(kind, k))

    def timesteps(self, k: int) -> int:
        search = self.settings.search_timesteps
        return search if search is not None and k < self.settings.rounds else self.src.timesteps

    def round_config(self, k: int) -> TrainConfig:
        dense = self.src.train
        epochs = self.settings.epochs_per_round or dense.epochs
        cooldown = dense.cooldown_epochs if epochs == dense.epochs else 0
        mixup_off = dense.mixup_off_epoch if epochs == dense.epochs else None
        return dataclasses.replace(
            dense, epochs=epochs, cooldown_epochs=cooldown, warmup_epochs=min(dense.warmup_epochs, epochs),
            mixup_off_epoch=mixup_off, seed=self.seed + k, eval_every=0,
        ).validate()

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

    # ---- rounds ---------------------------------------------------------------------------------------------
    def model_at(self, state_dict: dict[str, torch.Tensor], timesteps: int) -> nn.Module:
        meta = dict(self.src.ckpt.meta)
        meta["config"] = {**meta["config"], "timesteps": timesteps}
        return build_model(Checkpoint(state_dict, {}, meta, self.src.art.ref))

    def fresh_model(self, timesteps: int, seed: int) -> nn.Module:
        """A newly initialised model of the same architecture (and selector), from a seed of its own."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.model_at(self.src.ckpt.state_dict, timesteps)
            fresh = _reinitialised(model)
        return fresh

    def round_zero(self) -> None:
        if self.done("ticket", 0):
            return
        model = self.model_at(self.src.ckpt.state_dict, self.src.timesteps)
        self.log(f"round 0: evaluating {self.src.art.ref}")
        metrics = _test_metrics(model, self.src.train)
        self.save("ticket", 0, model, {}, metrics, self.src.train, parent=self.src.art.ref, timesteps=self.src.timesteps)

    def ticket_masks(self, k: int) -> dict[str, torch.Tensor]:
        """Round k's masks: computed on the main process from round k-1's trained weights, then shared."""
        prev = load_artifact(self.store, self.store.resolve(self.ref("ticket", k - 1)))
        prev_masks = prev.masks or M.full_masks(prev.state_dict, self.src.eligible)
        new = None
        if self.dist.is_main:
            new = M.magnitude_masks(prev.state_dict, prev_masks, self.levels[k - 1], self.settings.scope)
        return share_masks(new, prev_masks)

    def run_round(self, kind: str, k: int, rewind: _Rewind) -> None:
        timesteps = self.timesteps(k)
        if kind == "ticket":
            masks = self.ticket_masks(k)
        else:
            ticket = load_artifact(self.store, self.store.resolve(self.ref("ticket", k)))
            masks = ticket.masks
            if kind == "random-prune":
                masks = M.random_masks_like(masks, _derive_seed(self.seed, kind, k))
            masks = share_masks(masks if self.dist.is_main else None, masks)
        if kind == "random-reinit":
            model = self.fresh_model(timesteps, _derive_seed(self.seed, kind, k))
        else:
            model = self.model_at(rewind.state_dict, timesteps)
        cfg = self.round_config(k)
        resume = self.load_epoch_state(kind, k, model, masks)
        level = M.count_pruned(masks) / sum(m.numel() for m in masks.values())
        start = resume[1]["epoch"] if resume else 0
        self.log(
            f"{self.ref(kind, k)}: {level:.2%} of the eligible weights pruned, T={timesteps}, "
            f"{cfg.total_epochs} epochs" + (f" (resuming after epoch {start})" if resume else "")
        )
        hooks = TrainHooks(on_epoch_end=lambda state: self.save_epoch_state(kind, k, state, masks))
        result = fit(
            model, cfg, masks=masks, hooks=hooks, resume=resume, progress=self.progress,
            schedule_offset_iters=rewind.offset_iters,
        )
        parent = self.ref("ticket", k - 1) if kind == "ticket" else self.ref("ticket", k)
        self.save(kind, k, model, masks, result.metrics, cfg, parent=parent, timesteps=timesteps, rewind=rewind.label)
        self.drop_epoch_states(kind, k)

    # ---- store ----------------------------------------------------------------------------------------------
    def save(self, kind, k, model, masks, metrics, cfg, *, parent, timesteps, rewind=None) -> None:
        if self.dist.is_main:
            state_dict = {key: v.detach().cpu().clone() for key, v in model.state_dict().items()}
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
                },
            )
            save_checkpoint(self.store, self.name, self.tag(kind, k), Checkpoint(state_dict, masks, meta), parent=parent)
        distributed.barrier()

    def state_tag(self, kind: str, k: int, epoch: int) -> str:
        return f"{self.tag(kind, k)}-epoch-{epoch}"

    def save_epoch_state(self, kind: str, k: int, state, masks) -> None:
        if state.epoch >= state.cfg.total_epochs:
            return  # the round artifact follows at once
        if self.dist.is_main:
            tensors, info = state.state_tensors()
            model = state.model.module if hasattr(state.model, "module") else state.model
            blob = {key: v.detach().cpu() for key, v in model.state_dict().items()}
            blob.update({_MASK + key: m for key, m in masks.items()})
            blob.update(tensors)
            meta = {"imp": {"settings": self.identity, "kind": kind, "round": k, "epoch": state.epoch}, "state": info}
            self.store.put(
                self.name, self.state_tag(kind, k, state.epoch), blob, {"format": STATE_FORMAT}, meta,
                kind=STATE_KIND, parent=self.ref("ticket", k - 1 if kind == "ticket" else k), replace=True,
            )
            for old in self.epoch_states(kind, k):
                if old.tag != self.state_tag(kind, k, state.epoch):
                    self.store.delete(old.name, old.tag)
        distributed.barrier()

    def epoch_states(self, kind: str, k: int) -> list[Artifact]:
        prefix = f"{self.tag(kind, k)}-epoch-"
        states = [a for a in self.store.list(self.name) if a.tag.startswith(prefix) and a.kind == STATE_KIND]
        return sorted(states, key=lambda a: int(a.tag[len(prefix) :]))

    def load_epoch_state(self, kind: str, k: int, model: nn.Module, masks) -> tuple | None:
        states = self.epoch_states(kind, k)
        if not states:
            return None
        art = states[-1]
        tensors, _ = self.store.read(art)
        stored_masks = {key[len(_MASK) :]: v for key, v in tensors.items() if key.startswith(_MASK)}
        if M.mask_checksum(stored_masks) != M.mask_checksum(masks):
            raise SpkpruneError(f"{art.ref} was saved with other masks than this run computes; remove it and re-run")
        weights = {key: v for key, v in tensors.items() if not key.startswith((_MASK, *_STATE_PREFIXES))}
        model.load_state_dict(weights, strict=True)
        state = {key: v for key, v in tensors.items() if key.startswith(_STATE_PREFIXES)}
        return state, art.meta["state"]

    def drop_epoch_states(self, kind: str, k: int) -> None:
        if self.dist.is_main:
            for art in self.epoch_states(kind, k):
                self.store.delete(art.name, art.tag)
        distributed.barrier()

    def row(self, kind: str, k: int) -> RoundRow:
        art = self.store.resolve(self.ref(kind, k))
        sparsity, metrics, imp = art.meta["sparsity"], art.meta.get("metrics", {}), art.meta["imp"]
        return RoundRow(
            k, kind, art.ref, sparsity["prunable"], sparsity["total"], sparsity["remaining_prunable"],
            sparsity["remaining_total"], metrics.get("top1", float("nan")), metrics.get("top5", float("nan")),
            metrics.get("loss", float("nan")), imp["timesteps"], imp["mask_sha256"],
        )


def _check_pruned_zero(state_dict: dict[str, torch.Tensor], masks, where: str) -> None:
    """The invariant training must keep: every pruned weight is exactly zero (never silently re-applied here)."""
    for key, mask in masks.items():
        regrown = int(state_dict[key].masked_select(~mask).ne(0).sum())
        if regrown:
            raise RuntimeError(f"{where}: {regrown} pruned weights of {key} are non-zero after training")


def _reinitialised(model: nn.Module) -> nn.Module:
    """The same architecture with fresh parameters: a new Spikformer from its config (+ the same selector config)."""
    from spkprune.models import model_from_config

    fresh = model_from_config(model.config, preset=model.preset)
    if len(model.token_selectors):
        from spkprune.models.selector import attach_selectors, selector_config

        attach_selectors(fresh, selector_config(model))
    return fresh


def _derive_seed(seed: int, what: str, k: int) -> int:
    digest = hashlib.sha256(f"{seed}/{what}/{k}".encode()).hexdigest()
    return int(digest[:8], 16) % (2**31)


def _test_metrics(model: nn.Module, cfg: TrainConfig) -> dict:
    from spkprune.data import get_dataset

    data = get_dataset(cfg.dataset, "test", cfg.data_dir, timesteps=model.config.timesteps, augment=False)
    return evaluate(model, data, cfg.eval_batch_size, record_firing=False, amp=cfg.amp)


# ------------------------------------------------------------------------------------------ distributed
def share_masks(masks: dict[str, torch.Tensor] | None, template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Broadcast the main process's masks to every process and check that all hold the same (sha256).

    Without a process group this returns `masks` unchanged. `template` gives the keys and shapes on other ranks.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return masks
    device = distributed.current().device
    out = {}
    for key in template:  # the same order everywhere: the template comes from the same stored artifact
        buf = (masks[key] if masks is not None else template[key]).to(device=device, dtype=torch.uint8).contiguous()
        dist.broadcast(buf, src=0)
        out[key] = buf.bool().cpu()
    digests: list = [None] * dist.get_world_size()
    dist.all_gather_object(digests, M.mask_checksum(out))
    if len(set(digests)) != 1:
        raise RuntimeError(f"processes hold different masks after the broadcast: {digests}")
    return out


# ------------------------------------------------------------------------------------------------- public
def run_imp(
    store: Store,
    ref: str,
    name: str,
    settings: ImpSettings,
    *,
    control: str = "none",
    resume: bool = False,
    progress: bool = True,
    plot: str | Path | None = None,
    log: Log = lambda message: None,
) -> ImpReport:
    """Find a lottery ticket of `ref` in `settings.rounds` rounds, saved as `name@round-0..N` (+ a control).

    Idempotent: finished rounds are read back, an unfinished round resumes from its last saved epoch, and a run that
    is complete does nothing (`report.nothing_to_do`). `resume=True` demands that `name` already holds this run.
    """
    settings.validate()
    if control not in CONTROLS:
        raise SpkpruneError(f"unknown --control {control!r}; choose one of {', '.join(CONTROLS)}")
    parse_ref(format_ref(name, "round-0"))
    src = _load_source(store, ref, settings)
    if settings.search_timesteps is not None and settings.search_timesteps > src.timesteps:
        raise SpkpruneError(
            f"--search-timesteps {settings.search_timesteps} exceeds the model's {src.timesteps} time steps"
        )
    run = _Run(store, src, name, settings, progress, log)
    model_keys = list(run.model_at(src.ckpt.state_dict, src.timesteps).state_dict())
    rewind = _resolve_rewind(store, src, settings.rewind, model_keys)
    run.check_name_free_or_same()
    if resume and not store.exists(name, "round-0"):
        raise SpkpruneError(f"nothing to resume: the store holds no IMP run named {name!r}; drop --resume")
    distributed.barrier()  # every process decides what is pending from the same store state
    kinds = ["ticket"] + ([control] if control != "none" else [])
    todo = [(kind, k) for kind in kinds for k in range(0 if kind == "ticket" else 1, settings.rounds + 1)]
    pending = [(kind, k) for kind, k in todo if not run.done(kind, k)]
    if pending:
        run.round_zero()
        for kind, k in pending:
            if k > 0:
                run.run_round(kind, k, rewind)
    rows = [run.row(kind, k) for kind in _present_kinds(run) for k in _round_range(kind, settings.rounds)]
    report = ImpReport(name, rows, nothing_to_do=not pending, settings=run.identity)
    target = Path(plot) if plot is not None else store.root / "plots" / f"{name}-imp.png"
    if distributed.is_main() and (pending or plot is not None or not target.exists()):
        report.plot = plot_imp(report, target)
    elif target.exists():
        report.plot = target
    return report


def _present_kinds(run: _Run) -> list[str]:
    """The ticket, then every control that has all its rounds in the store."""
    kinds = ["ticket"]
    for control in CONTROLS[1:]:
        if all(run.done(control, k) for k in range(1, run.settings.rounds + 1)):
            kinds.append(control)
    return kinds


def _round_range(kind: str, rounds: int) -> range:
    return range(0 if kind == "ticket" else 1, rounds + 1)


# ---------------------------------------------------------------------------------------------------- plot
_STYLE = {
    "ticket": dict(color="tab:blue", marker="o", label="winning ticket (IMP, rewound)"),
    "random-reinit": dict(color="tab:red", marker="s", linestyle="--", label="control: same masks, random re-init"),
    "random-prune": dict(color="tab:orange", marker="^", linestyle=":", label="control: random masks, same layer sparsity"),
}


def plot_imp(report: ImpReport, path: str | Path) -> Path:
    """Accuracy against sparsity over the prunable weights (ticket and controls), written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    dense = next((r for r in report.rows if r.round == 0), None)
    for kind, style in _STYLE.items():
        rows = [r for r in report.rows if r.kind == kind]
        if kind != "ticket" and rows and dense is not None:
            rows = [dense] + rows
        if rows:
            ax.plot([100 * r.sparsity_prunable for r in rows], [100 * r.top1 for r in rows], **style)
    if dense is not None:
        ax.axhline(100 * dense.top1, color="grey", linewidth=0.8, linestyle="-.", label="dense (round 0)")
    ax.set_xlabel("sparsity over prunable weights (%)")
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_title(f"{report.name}: accuracy vs sparsity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{id(fig)}.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


def describe(report: ImpReport) -> dict:
    """The JSON-able summary that goes beside the table (`--format json`)."""
    ticket = [r for r in report.rows if r.kind == "ticket"]
    final = ticket[-1] if ticket else None
    return {
        "name": report.name,
        "nothing_to_do": report.nothing_to_do,
        "final": final.ref if final else None,
        "final_mask_sha256": final.mask_sha256 if final else None,
        "plot": str(report.plot) if report.plot else None,
        "settings": json.loads(json.dumps(report.settings)),
    }

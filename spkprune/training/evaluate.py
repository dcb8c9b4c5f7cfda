"""Evaluation: top-1 / top-5 accuracy, loss, and the firing rate of every neuron site."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from spkprune.data.loader import make_loader
from spkprune.models.fastpath import prepare_for_inference


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class FiringRecorder:
    """Forward hooks on `model.neuron_sites()` summing output spikes and counting elements."""

    def __init__(self, model: nn.Module):
        sites = getattr(_unwrap(model), "neuron_sites", lambda: {})()
        self.totals = {name: [0.0, 0] for name in sites}
        self.handles = [site.register_forward_hook(self._hook(name)) for name, site in sites.items()]

    def _hook(self, name: str):
        def record(_module, _inputs, output):
            entry = self.totals[name]
            entry[0] += float(output.detach().float().sum())
            entry[1] += output.numel()

        return record

    def rates(self) -> dict[str, float]:
        return {name: (spikes / count if count else 0.0) for name, (spikes, count) in self.totals.items()}

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def evaluate(
    model: nn.Module,
    data: Dataset | DataLoader,
    batch_size: int = 256,
    *,
    record_firing: bool = True,
    device: torch.device | str | None = None,
    amp: bool = True,
    compile: bool = False,
) -> dict:
    """`{"top1", "top5", "loss", "samples", "firing": {site: rate}}` over the whole data set (model in eval mode).

    top-5 is top-min(5, classes). Accuracies are fractions in [0, 1]; the firing rate of a site is the mean of its
    output spikes over samples, time steps, tokens and channels.
    """
    loader = data if isinstance(data, DataLoader) else make_loader(data, batch_size, train=False, distributed=False)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = _unwrap(model)
    was_training = model.training
    # BatchNorm folded into its conv/linear on an eval-only copy: same spikes, less work (docs/performance.md).
    # With `compile`, every neuron runs one fused torch.compile kernel (same spikes, ~10 s to compile per process).
    fast = prepare_for_inference(model, compile=compile) if hasattr(model, "neuron_sites") else model.eval()
    recorder = FiringRecorder(fast) if record_firing else None
    correct1 = correct5 = 0
    loss_sum, seen = 0.0, 0
    try:
        for images, targets in loader:
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with torch.inference_mode(), _autocast(device, amp):
                logits = fast(images)
            logits = logits.float()
            loss_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top.eq(targets[:, None])
            correct1 += int(hits[:, 0].sum())
            correct5 += int(hits.any(dim=1).sum())
            seen += len(targets)
    finally:
        if recorder is not None:
            recorder.close()
        model.train(was_training)
    metrics = {
        "top1": correct1 / max(seen, 1),
        "top5": correct5 / max(seen, 1),
        "loss": loss_sum / max(seen, 1),
        "samples": seen,
    }
    if recorder is not None:
        metrics["firing"] = recorder.rates()
    return metrics


def evaluate_checkpoint(
    ref: str,
    store_path=None,
    *,
    dataset: str | None = None,
    data_dir: str | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    compile: bool = False,
) -> dict:
    """Load `ref` (store reference, file, folder or hf://), evaluate it on the test split of its data set.

    Returns `evaluate()`'s metrics plus `ref`, `dataset` and `tokens_per_block` (None for a model without token
    selectors).
    """
    from pathlib import Path

    from spkprune.checkpoint import build_model, load_checkpoint
    from spkprune.data import get_dataset
    from spkprune.errors import SpkpruneError
    from spkprune.store import Store

    store = None
    if store_path is not None and Path(store_path).is_dir():
        store = Store.open(store_path, create=False)
    ckpt = load_checkpoint(ref, store)
    train_meta = ckpt.meta.get("train") or {}
    dataset = dataset or train_meta.get("dataset") or (ckpt.meta.get("config") or {}).get("dataset")
    if not dataset:
        raise SpkpruneError(f"{ckpt.ref or ref} does not say which data set it was trained on; pass --dataset")
    if data_dir is None and dataset == train_meta.get("dataset"):
        data_dir = train_meta.get("data_dir")
    model = build_model(ckpt)
    from spkprune.training.runner import check_compatible

    check_compatible(model, dataset)
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = get_dataset(dataset, "test", data_dir, timesteps=model.config.timesteps)
    metrics = evaluate(model.to(device), data, batch_size, record_firing=True, device=device, compile=compile)
    tokens = None
    if len(getattr(model, "token_selectors", {})) > 0:
        from spkprune.models.selector import tokens_per_block

        tokens = tokens_per_block(model)
    return {"ref": ckpt.ref or ref, "dataset": dataset, **metrics, "tokens_per_block": tokens}

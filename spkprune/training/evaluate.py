"""Evaluation: top-1 / top-5 accuracy, loss, and the firing rate of every neuron site."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from spkprune.data.loader import make_loader
from spkprune.models.fastpath import prepare_for_inference
from spkprune.training.amp import autocast
from spkprune.training.distributed import unwrap


class FiringRecorder:
    """Forward hooks on `model.neuron_sites()` summing output spikes and counting elements."""

    def __init__(self, model: nn.Module):
        sites = getattr(unwrap(model), "neuron_sites", lambda: {})()
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
    model = unwrap(model)
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
            with torch.inference_mode(), autocast(device, amp):
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

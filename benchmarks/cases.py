"""What the benchmarks run: training steps, evaluation passes, export round trips. Random inputs of the preset's
shape; throughput does not depend on the pixel values beyond the firing rates, which random weights keep realistic."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import spkprune
from spkprune.models import fastpath

PATHS = ("plain", "fast")
COMPILED_PATH = "fast compiled"  # the fast path with its fused kernels through torch.compile


def make_model(preset: str, seed: int = 0):
    torch.manual_seed(seed)
    return spkprune.create_model(preset)


def batch_for(model, batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    shape = (batch, cfg.in_channels, cfg.img_size, cfg.img_size)
    if cfg.variant == "dvs":
        shape = (batch, cfg.timesteps, *shape[1:])
    images = torch.rand(shape, generator=g)
    return images, torch.randint(0, cfg.num_classes, (batch,), generator=g)


class TrainStep:
    """One step as `spkprune.training.fit` takes it: forward, loss, backward, (mask gradients), AdamW, (re-zero)."""

    def __init__(self, model, net, images, targets, masks=None):
        from spkprune.training.masking import MaskEnforcer

        self.model, self.net, self.images, self.targets = model, net, images, targets
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.masks = MaskEnforcer(model, self.optimizer, masks or {})
        self.masks.apply()
        self.mask_seconds: list[float] = []  # per call: what the MaskEnforcer added to the step

    def prime(self) -> None:
        """Create the optimizer state without a forward pass (so it counts in the memory baseline)."""
        for p in self.model.parameters():
            p.grad = torch.zeros_like(p)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self) -> None:
        logits = self.net(self.images)
        loss = F.cross_entropy(logits, self.targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        start = time.perf_counter()
        self.masks.mask_gradients()
        masking = time.perf_counter() - start
        self.optimizer.step()
        start = time.perf_counter()
        self.masks.apply()
        self.mask_seconds.append(masking + time.perf_counter() - start)


def training_net(model, path: str):
    """`plain`: spikingjelly's LIF and separate BatchNorms in the original code's layout; `fast`: lean LIF, fused
    BatchNorm + LIF, bool spike packing; `fast compiled`: the same with the fused kernels through torch.compile."""
    model.train()
    if path == "plain":
        return fastpath.prepare_for_training(model, backend="spikingjelly", pack_spikes=False)
    return fastpath.prepare_for_training(model, backend="lean", pack_spikes=True, compile=path == COMPILED_PATH)


def training_setup(preset: str, batch: int, path: str, masks: dict | None = None) -> TrainStep:
    model = make_model(preset)
    images, targets = batch_for(model, batch)
    return TrainStep(model, training_net(model, path), images, targets, masks)


# ---- where the time goes ----------------------------------------------------------------------------------------------

DENSE_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::mkldnn_convolution", "aten::convolution_backward")


def dense_time(fn) -> dict[str, float]:
    """CPU seconds of one profiled `fn()`: in dense matrix products and convolutions, and in total."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    return {
        "dense_s": sum(e.self_cpu_time_total for e in events if e.key in DENSE_OPS) / 1e6,
        "total_s": sum(e.self_cpu_time_total for e in events) / 1e6,
    }


def magnitude_masks(model, sparsity: float) -> dict[str, torch.Tensor]:
    """Layer-wise magnitude masks keeping the largest `1 - sparsity` of every prunable weight."""
    masks = {}
    for name, weight in model.prunable_weights().items():
        k = int(weight.numel() * sparsity)
        if k < 1:
            continue
        threshold = weight.detach().abs().flatten().kthvalue(k).values
        masks[name] = weight.detach().abs() > threshold
    return masks


# ---- evaluation -------------------------------------------------------------------------------------------------------


class EvalPass:
    """One forward over a batch without autograd (`torch.no_grad` for plain, `torch.inference_mode` for fast)."""

    def __init__(self, net, images, inference_mode: bool):
        self.net, self.images = net, images
        self.context = torch.inference_mode if inference_mode else torch.no_grad

    def __call__(self) -> None:
        with self.context():
            self.net(self.images)


def eval_setups(preset: str, batch: int, keeps: tuple[float, ...], compile: bool = False) -> dict[str, EvalPass]:
    """Plain (spikingjelly neurons, BatchNorm, no_grad), fast dense, and fast with tokens gathered at each keep ratio."""
    from spkprune.models.selector import attach_selectors

    model = make_model(preset).eval()
    images, _ = batch_for(model, batch)
    plain = fastpath.set_neuron_backend(make_model(preset).eval(), "spikingjelly")
    cases = {
        "plain": EvalPass(plain, images, inference_mode=False),
        "fast keep 1.0": EvalPass(fastpath.prepare_for_inference(model), images, inference_mode=True),
    }
    for keep in keeps:
        gathered = attach_selectors(make_model(preset), {"keep": keep, "scorer": "learned"}).eval()
        cases[f"fast keep {keep}"] = EvalPass(fastpath.prepare_for_inference(gathered), images, inference_mode=True)
    if compile:
        cases["fast keep 1.0 compiled"] = EvalPass(
            fastpath.prepare_for_inference(model, compile=True), images, inference_mode=True
        )
    return cases


# ---- export -------------------------------------------------------------------------------------------------------------


def export_sizes(preset: str, sparsity: float, repeats: int) -> list[dict]:
    """Dense and sparse export of a magnitude-pruned model: file sizes and median load times."""
    from spkprune.checkpoint.folder import read_folder, weight_files, write_weights

    model = make_model(preset)
    masks = magnitude_masks(model, sparsity)
    with torch.no_grad():
        for name, weight in model.prunable_weights().items():
            if name in masks:
                weight.mul_(masks[name])
    state_dict = model.state_dict()
    meta = {"arch": preset, "config": model.config.to_dict()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("dense", "sparse"):
            folder = Path(tmp) / fmt
            folder.mkdir()
            config = write_weights(folder, state_dict, masks, meta, fmt=fmt)
            size = sum((folder / name).stat().st_size for name in weight_files(config))
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                ckpt = read_folder(folder)
                times.append(time.perf_counter() - start)
            assert all(torch.equal(ckpt.state_dict[k], v) for k, v in state_dict.items())
            rows.append({"format": fmt, "bytes": size, "load_s": sorted(times)[len(times) // 2]})
    return rows

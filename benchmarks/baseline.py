"""The model a user would pick instead of spkprune: spikingjelly 2.0's own Spikformer
(`spikingjelly.activation_based.model.spikformer.Spikformer`), built with the same 4-384 CIFAR shapes as
`spikformer-4-384-cifar10` (T 4, 32x32x3 images, patch size 4, 384 channels, 12 heads, MLP ratio 4, 4 blocks, 10
classes) and its default neurons (LIF, tau 2.0, detached reset, multi-step), run as its documentation shows: reset
the network, call it on the images, average the per-step logits over T."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.cases import EvalPass, batch_for, make_model

NAME = "spikingjelly Spikformer"


def spikingjelly_spikformer(preset: str, seed: int = 0) -> torch.nn.Module:
    """spikingjelly's Spikformer with the shapes of spkprune's CIFAR preset `preset`."""
    from spikingjelly.activation_based.model.spikformer import Spikformer  # heavy import, only when measured

    cfg = make_model(preset).config
    if cfg.variant != "cifar":
        raise ValueError(f"the spikingjelly baseline covers the CIFAR presets, not {preset}")
    torch.manual_seed(seed)
    return Spikformer(
        T=cfg.timesteps, in_channels=cfg.in_channels, img_size_h=cfg.img_size, img_size_w=cfg.img_size,
        patch_size=2 ** cfg.num_pools, num_classes=cfg.num_classes, embed_dims=cfg.embed_dim,
        num_heads=cfg.num_heads, mlp_ratio=float(cfg.mlp_ratio), depths=cfg.depth,
    )


class SpikingjellyNet(torch.nn.Module):
    """Reset every neuron, run the multi-step model, average the logits over time: `[B, classes]` like spkprune's."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from spikingjelly.activation_based import functional

        functional.reset_net(self.model)
        return self.model(images).mean(0)


class SpikingjellyTrainStep:
    """One training step as `benchmarks.cases.TrainStep` takes it (no masks): forward, loss, backward, AdamW."""

    def __init__(self, preset: str, batch: int):
        self.model = spikingjelly_spikformer(preset).train()
        self.net = SpikingjellyNet(self.model)
        self.images, self.targets = batch_for(make_model(preset), batch)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)

    def __call__(self) -> None:
        loss = F.cross_entropy(self.net(self.images), self.targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def eval_pass(preset: str, batch: int) -> EvalPass:
    """One forward over a batch under `torch.no_grad` (as the plain path), in eval mode."""
    images, _ = batch_for(make_model(preset), batch)
    return EvalPass(SpikingjellyNet(spikingjelly_spikformer(preset).eval()), images, inference_mode=False)


def parameter_count(preset: str) -> tuple[int, int]:
    """(spkprune's preset, spikingjelly's model): parameters, to show the shapes match."""
    return (sum(p.numel() for p in make_model(preset).parameters()),
            sum(p.numel() for p in spikingjelly_spikformer(preset).parameters()))

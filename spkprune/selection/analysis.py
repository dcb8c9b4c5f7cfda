"""Firing-rate analysis of the tokens: which tokens fire, which ones a selector keeps, and whether they fire more.

`analyze_tokens(model, images)` runs the model in eval mode with its selectors in mask mode (so every token keeps its
original position) and records, for every block, each token's firing rate entering it (its mean value over time
steps and channels; residual-stream tokens are sums of spike maps, so this can exceed 1), and for every selector, the
tokens it kept. `rate_table` compares kept and dropped tokens; `plot_*` draw the pictures (matplotlib, Agg).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from spkprune.checkpoint import build_model
from spkprune.data import get_dataset
from spkprune.errors import SpkpruneError
from spkprune.models.selector import attach_selectors, selectors_of, set_selector_mode
from spkprune.paths import save_png


@dataclass
class TokenAnalysis:
    """`rates[block]`: `[B, N]` firing rate of the tokens entering the block (NaN where a selector dropped the token);
    `kept[loc]` / `present[loc]`: `[B, N]` bool, tokens kept by the selector before block `loc` / the tokens it chose
    among; `images`: the inputs; `grid`: tokens per side."""

    images: torch.Tensor
    rates: dict[int, torch.Tensor]
    kept: dict[int, torch.Tensor]
    present: dict[int, torch.Tensor]
    selector_rates: dict[int, torch.Tensor]
    grid: int
    keep_ratios: dict[int, float]


@torch.no_grad()
def analyze_tokens(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> TokenAnalysis:
    """Per-token firing rates entering each block and each selector's decisions on `images` (in batches)."""
    selectors = selectors_of(model)
    modes = {loc: s.mode for loc, s in selectors.items()}
    was_training = model.training
    model.eval()
    set_selector_mode(model, "mask")
    blocks = model.token_blocks()  # the ones working on the selectors' tokens (QKFormer: its last stage)
    rates: dict[int, list] = {i: [] for i, _ in blocks}
    kept: dict[int, list] = {loc: [] for loc in selectors}
    present: dict[int, list] = {loc: [] for loc in selectors}
    selector_rates: dict[int, list] = {loc: [] for loc in selectors}
    handles = [_block_hook(block, rates[i], model.token_layout.to_tokens) for i, block in blocks]
    handles += [_selector_hook(s, kept[loc], present[loc], selector_rates[loc]) for loc, s in selectors.items()]
    device = next(model.parameters()).device
    try:
        for start in range(0, len(images), batch_size):
            model(images[start : start + batch_size].to(device))
    finally:
        for handle in handles:
            handle.remove()
        for loc, selector in selectors.items():
            selector.set_mode(modes[loc])
        model.train(was_training)
    cat = lambda parts: {k: torch.cat(v).cpu() for k, v in parts.items()}  # noqa: E731
    return TokenAnalysis(
        images.cpu(), cat(rates), cat(kept), cat(present), cat(selector_rates), math.isqrt(model.num_tokens),
        {loc: s.keep_ratio for loc, s in selectors.items()},
    )


def _token_rate(tokens: torch.Tensor) -> torch.Tensor:  # [T, B, N, C] -> [B, N]
    return tokens.float().mean(dim=(0, 3))


def _block_hook(block: nn.Module, sink: list, to_tokens):
    def hook(_module, args):
        tokens = to_tokens(args[0])  # the family's layout -> [T, B, N, C]
        keep = args[1] if len(args) > 1 else None
        rate = _token_rate(tokens)
        if keep is not None:
            rate = rate.masked_fill(~keep.bool(), float("nan"))
        sink.append(rate)

    return block.register_forward_pre_hook(hook)


def _selector_hook(selector: nn.Module, kept: list, present: list, rates: list):
    def hook(_module, args, output):
        tokens, keep_in = args[0], (args[1] if len(args) > 1 else None)
        _, keep_out = output
        before = torch.ones_like(keep_out, dtype=torch.bool) if keep_in is None else keep_in.bool()
        present.append(before)
        kept.append(keep_out.bool())
        rates.append(_token_rate(tokens))

    return selector.register_forward_hook(hook)


def rate_table(analysis: TokenAnalysis) -> pd.DataFrame:
    """Per selector: tokens in and kept per image, mean firing rate of kept and of dropped tokens (over every
    image and token), and the fraction of images whose kept tokens fire more on average than their dropped ones."""
    rows = []
    for loc, kept in analysis.kept.items():
        present, rate = analysis.present[loc], analysis.selector_rates[loc]
        dropped = present & ~kept
        kept_mean = _masked_mean(rate, kept)
        dropped_mean = _masked_mean(rate, dropped)
        per_image_kept = _masked_mean(rate, kept, dim=1)
        per_image_dropped = _masked_mean(rate, dropped, dim=1)
        rows.append(
            {
                "block": loc,
                "keep_ratio": analysis.keep_ratios[loc],
                "tokens_in": float(present.sum(1).float().mean()),
                "tokens_kept": float(kept.sum(1).float().mean()),
                "rate_kept": kept_mean,
                "rate_dropped": dropped_mean,
                "kept_fires_more": float((per_image_kept > per_image_dropped).float().mean()),
            }
        )
    return pd.DataFrame(rows, columns=["block", "keep_ratio", "tokens_in", "tokens_kept", "rate_kept", "rate_dropped",
                                       "kept_fires_more"])


def _masked_mean(values: torch.Tensor, mask: torch.Tensor, dim=None):
    total = (values * mask).sum() if dim is None else (values * mask).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    if dim is None:
        return float(total / count) if int(count) else float("nan")
    return total / count.clamp_min(1)


# ---- pictures ---------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib  # matplotlib takes a second to import; only the pictures need it

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _display(image: torch.Tensor) -> tuple[np.ndarray, str]:
    """An input as something imshow can draw: grey, RGB (rescaled to [0,1]) or, for event frames, ON - OFF."""
    x = image.float()
    if x.dim() == 4:  # [T, 2, H, W] event frames
        x = x.sum(0)
        return (x[0] - x[-1]).numpy(), "coolwarm"
    if x.shape[0] == 1:
        return x[0].numpy(), "gray"
    x = x[:3]
    x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-8)
    return x.permute(1, 2, 0).numpy(), None


def _grid(values: torch.Tensor, grid: int) -> np.ndarray:
    return values.reshape(grid, grid).numpy()


def plot_token_rates(analysis: TokenAnalysis, path: str | Path, num_images: int = 6) -> Path:
    """Rows: images. Columns: the input, then the firing rate of every token entering each block (grey = dropped)."""
    plt = _pyplot()
    blocks = sorted(analysis.rates)
    n = min(num_images, len(analysis.images))
    cols = len(blocks) + 1
    fig, axes = plt.subplots(
        n + 1, cols, figsize=(1.9 * cols, 1.9 * n + 0.9), squeeze=False,
        gridspec_kw={"height_ratios": [1.0] * n + [0.07]},
    )
    cmap = plt.get_cmap("magma").with_extremes(bad="lightgrey")
    for col, block in enumerate(blocks, start=1):
        vmax = float(np.nanmax(analysis.rates[block][:n].numpy())) or 1.0
        for row in range(n):
            image = axes[row, col].imshow(_grid(analysis.rates[block][row], analysis.grid), cmap=cmap, vmin=0,
                                          vmax=vmax)
        axes[0, col].set_title(f"into block {block}", fontsize=9)
        fig.colorbar(image, cax=axes[n, col], orientation="horizontal")
    axes[n, 0].set_visible(False)
    for row in range(n):
        picture, image_cmap = _display(analysis.images[row])
        axes[row, 0].imshow(picture, cmap=image_cmap)
    axes[0, 0].set_title("input", fontsize=9)
    for ax in axes[:n].flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("token firing rate (mean over time and channels); grey = dropped", fontsize=10)
    fig.tight_layout()
    return save_png(fig, path, dpi=110)


def plot_kept_tokens(analysis: TokenAnalysis, path: str | Path, num_images: int = 6) -> Path:
    """Rows: images. Columns: the input, then the input with the tokens each selector dropped darkened."""
    plt = _pyplot()
    locations = sorted(analysis.kept)
    n = min(num_images, len(analysis.images))
    fig, axes = plt.subplots(n, len(locations) + 1, figsize=(1.9 * (len(locations) + 1), 1.9 * n + 0.4),
                             squeeze=False)
    for row in range(n):
        picture, cmap = _display(analysis.images[row])
        axes[row, 0].imshow(picture, cmap=cmap)
        height, width = picture.shape[:2]
        for col, loc in enumerate(locations, start=1):
            axes[row, col].imshow(picture, cmap=cmap)
            kept = _grid(analysis.kept[loc][row].float(), analysis.grid)
            cover = np.kron(1.0 - kept, np.ones((height // analysis.grid, width // analysis.grid)))
            axes[row, col].imshow(np.zeros_like(cover), cmap="gray", alpha=0.8 * cover, vmin=0, vmax=1)
    axes[0, 0].set_title("input", fontsize=9)
    for col, loc in enumerate(locations, start=1):
        kept = float(analysis.kept[loc].sum(1).float().mean())
        axes[0, col].set_title(f"before block {loc}: {kept:.0f} kept", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("kept tokens (dark = dropped)", fontsize=10)
    fig.tight_layout()
    return save_png(fig, path, dpi=110)


def plot_rate_summary(analysis: TokenAnalysis, path: str | Path) -> Path:
    """Top row: mean firing rate of every token position entering each block (over images, kept tokens only).
    Bottom row: how often each selector keeps each position."""
    plt = _pyplot()
    blocks = sorted(analysis.rates)
    locations = sorted(analysis.kept)
    cols = max(len(blocks), 1)
    rows = 2 if locations else 1
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.3 * rows + 0.4), squeeze=False)
    for col, block in enumerate(blocks):
        mean = torch.nanmean(analysis.rates[block], dim=0)
        image = axes[0, col].imshow(_grid(mean, analysis.grid), cmap="magma", vmin=0)
        axes[0, col].set_title(f"rate into block {block}", fontsize=9)
        fig.colorbar(image, ax=axes[0, col], shrink=0.8)
    for col, loc in enumerate(locations):
        frequency = analysis.kept[loc].float().mean(0)
        image = axes[1, col].imshow(_grid(frequency, analysis.grid), cmap="viridis", vmin=0, vmax=1)
        axes[1, col].set_title(f"kept before block {loc}", fontsize=9)
        fig.colorbar(image, ax=axes[1, col], shrink=0.8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        if not ax.images:
            ax.set_visible(False)
    fig.suptitle(f"over {len(analysis.images)} images", fontsize=10)
    fig.tight_layout()
    return save_png(fig, path, dpi=110)


def write_analysis(analysis: TokenAnalysis, out_dir: str | Path, prefix: str = "", num_images: int = 6) -> dict:
    """The three pictures and the table (`token_rates.csv`) in `out_dir`; returns their paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "token_rates": plot_token_rates(analysis, out / f"{prefix}token_rates.png", num_images),
        "rate_summary": plot_rate_summary(analysis, out / f"{prefix}rate_summary.png"),
    }
    if analysis.kept:
        paths["kept_tokens"] = plot_kept_tokens(analysis, out / f"{prefix}kept_tokens.png", num_images)
        table_path = out / f"{prefix}kept_vs_dropped.csv"
        rate_table(analysis).to_csv(table_path, index=False)
        paths["table"] = table_path
    return paths


# ---- from a checkpoint ------------------------------------------------------------------------------------------


def analysis_model(ckpt, selector: dict | None = None) -> nn.Module:
    """The model to analyse: the checkpoint's own selectors, or (for a dense checkpoint) `selector` attached as is,
    by default the training-free firing-rate scorer at keep 0.7. A learned scorer needs training first."""
    model = build_model(ckpt)
    if len(model.token_selectors):
        return model
    selector = {"keep": 0.7, "scorer": "firing-rate", **(selector or {})}
    if selector["scorer"] == "learned":
        raise SpkpruneError(
            f"{ckpt.ref or 'the checkpoint'} has no trained selector: analyse a select-tokens result, or use "
            "--scorer firing-rate or random"
        )
    return attach_selectors(model, selector)


def sample_images(dataset: str, data_dir: str | None, count: int, timesteps: int | None,
                  img_size: int | None = None) -> torch.Tensor:
    """The first `count` images of the test split (a fixed, reproducible sample) at the model's image size."""
    data = get_dataset(dataset, "test", data_dir, timesteps=timesteps, img_size=img_size)
    count = min(count, len(data))
    return torch.stack([data[i][0] for i in range(count)])

"""The Spiking Token Selector of SparseSpikformer (arXiv 2311.08806), made consistent between training and inference.

A `TokenSelector` sits before a block (`model.token_selectors[str(block)]`) and keeps a cumulative fraction
`keep_ratio` of the model's original tokens: `k = int(N * keep_ratio)` tokens per image, one decision per image shared
by all time steps, chosen only among the tokens that earlier selectors kept (D̂ = D̂ ⊙ D).

Scorers:
- `learned` (the paper): time-averaged spikes -> Linear(C, C/2) -> GELU -> Linear(C/2, 2) -> log-softmax (column 0 =
  keep). Training samples a hard Gumbel-softmax decision (tau 1) per token; inference keeps the top-k keep scores.
- `firing-rate` (training-free): the token's mean value over time and channels. Tokens in the residual stream are
  sums of spike maps (integers 0..4+), so this is their mean firing rate, not a binary rate.
- `random` (the control of the paper's Table 3): a random ranking per image from the torch RNG.

Modes (inference only; training always masks because Gumbel decisions keep a different number of tokens per image):
- `gather` (default): the kept tokens are physically gathered, `[T, B, K, C]`, so later work really shrinks;
- `mask`: all tokens stay and a `[B, N]` keep mask goes to the blocks, which exclude masked tokens from attention,
  BatchNorm statistics and pooling. Both modes give the same logits in eval mode (tested to 1e-5).

Actions (`spkprune.models.token_flow`, which runs every family's blocks): `drop` (default) removes the tokens not
kept; `skip` (TP-Spikformer) stops updating them and carries them unchanged to the final pooling over all N tokens.

Gradients for the learned scorer: the model's blocks take a boolean mask, so the straight-through path runs through a
gate on the tokens, `tokens * (D - D.detach() + 1)`: the forward value is unchanged bit for bit and dL/dD is the
derivative of the loss with respect to scaling each token (the DynamicViT / reference-code estimator gates the
attention columns instead; both are "what if this token counted a little more").
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from spkprune.errors import SpkpruneError
from spkprune.models.token_flow import dense_block_tokens

SCORERS = ("learned", "firing-rate", "random")
MODES = ("gather", "mask")
ACTIONS = ("drop", "skip")  # what becomes of the tokens a selector does not keep (`spkprune.models.token_flow`)
DEFAULT_SCORER = "learned"
_EPS = 1e-9  # int() truncation of N * ratio, robust to 0.7**2 * 100 = 48.99999...
# Spread of the warm-started keep-minus-drop logits: wide enough that Gumbel sampling mostly follows the firing-rate
# ranking, narrow enough that tokens near the cut are still explored and the soft gradient does not vanish.
WARM_START_LOGIT_STD = 2.0


def tokens_kept(num_tokens: int, keep_ratio: float) -> int:
    """`int(N * ratio)`, the reference code's count of tokens kept (robust to floating-point error)."""
    return int(math.floor(num_tokens * keep_ratio + _EPS))


class _Track:
    """Per-forward state shared by the selectors of one model: the original index of every token that is still
    present, so that gathered and masked runs choose the same tokens (the random scorer draws its scores over the
    original token positions) and the analysis can map kept tokens back onto the image."""

    def __init__(self):
        self.index: torch.Tensor | None = None  # [B, N_current] original positions, None = identity


class TokenSelector(nn.Module):
    """Keep `int(num_tokens * keep_ratio)` tokens per image, scored by `scorer`.

    `forward(tokens [T,B,N,C], keep [B,N] | None) -> (tokens, keep)`: in mask mode (and in training) the tokens come
    back unchanged (up to the straight-through gate) with the new cumulative keep mask; in gather mode the kept
    tokens come back in their original order, `[T,B,K,C]`, with keep None.
    """

    def __init__(
        self,
        dim: int,
        keep_ratio: float,
        scorer: str = DEFAULT_SCORER,
        num_tokens: int | None = None,
        initial_keep: float | None = None,
        action: str = "drop",
    ):
        super().__init__()
        if scorer not in SCORERS:
            raise SpkpruneError(f"unknown token scorer {scorer!r}; choose one of {', '.join(SCORERS)}")
        if action not in ACTIONS:
            raise SpkpruneError(f"unknown token action {action!r}; choose one of {', '.join(ACTIONS)}")
        _check_ratio(keep_ratio)
        self.action = action
        self.dim = dim
        self.keep_ratio = float(keep_ratio)
        self.scorer = scorer
        self.num_tokens = num_tokens
        self.mode = "gather"
        self.track = _Track()
        self.last_kept: float | None = None  # mean tokens kept per image in the last forward
        self.last_mask: torch.Tensor | None = None  # [B, N_original] bool, tokens kept after this selector
        self.last_decision: torch.Tensor | None = None  # [B, N_original] float cumulative decision (with grad)
        if scorer == "learned":
            hidden = max(dim // 2, 1)
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 2), nn.LogSoftmax(dim=-1))
            for layer in (self.mlp[0], self.mlp[2]):
                nn.init.trunc_normal_(layer.weight, std=0.02, a=-2.0, b=2.0)  # timm's init, as the model's Linears
                nn.init.zeros_(layer.bias)
            if initial_keep is not None:
                # Start sampling at the target rate instead of 1/2, so fine-tuning does not first spend its steps
                # on the ratio term (the reference code starts at 1/2 and trains for hundreds of epochs).
                p = min(max(float(initial_keep), 1e-3), 1 - 1e-3)
                with torch.no_grad():
                    self.mlp[2].bias.copy_(torch.tensor([math.log(p), math.log(1 - p)]))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, keep_ratio={self.keep_ratio}, scorer={self.scorer!r}, action={self.action!r}, "
                f"mode={self.mode!r}")

    @property
    def has_weights(self) -> bool:
        return self.scorer == "learned"

    def set_mode(self, mode: str) -> "TokenSelector":
        if mode not in MODES:
            raise SpkpruneError(f"unknown selector mode {mode!r}; choose one of {', '.join(MODES)}")
        self.mode = mode
        return self

    def k(self, num_tokens: int | None = None) -> int:
        return tokens_kept(num_tokens or self.num_tokens, self.keep_ratio)

    # ---- firing-rate warm start (learned scorer) -----------------------------------------------------------------

    def start_from_firing_rate(self) -> None:
        """Make the learned MLP rank tokens by firing rate: hidden unit 0 reads the mean over channels (the firing
        rate), and only it feeds the keep-minus-drop logit. GELU is increasing on the rates (>= 0), so top-k of
        the keep score is then the firing-rate ranking up to the other units' small random weights."""
        hidden, out = self.mlp[0], self.mlp[2]
        with torch.no_grad():
            hidden.weight[0].fill_(1.0 / self.dim)
            hidden.bias[0] = 0.0
            out.weight[:, 0] = torch.tensor([0.5, -0.5])

    @torch.no_grad()
    def calibrate(self, tokens: torch.Tensor, keep: torch.Tensor | None, target: float,
                  logit_std: float = WARM_START_LOGIT_STD) -> None:
        """Scale and shift the firing-rate unit's logit on sample `tokens [T,B,N,C]` (only those `keep` marks
        present) so that keep-minus-drop logits spread with std `logit_std` and their sigmoids (the Gumbel keep
        probabilities) average `target`."""
        out = self.mlp[2]
        present = keep.bool() if keep is not None else torch.ones(tokens.shape[1:3], dtype=torch.bool,
                                                                  device=tokens.device)
        unit = F.gelu(self.mlp[0](tokens.mean(0))[..., 0])[present]
        gain = logit_std / float(unit.std().clamp_min(1e-6))
        out.weight[:, 0] = torch.tensor([0.5 * gain, -0.5 * gain])
        out.bias.zero_()
        logits = self.keep_log_probs(tokens)
        difference = (logits[..., 0] - logits[..., 1])[present]
        low, high = -50.0, 50.0
        for _ in range(60):  # bisection: the mean keep probability increases with the offset
            offset = (low + high) / 2
            if float(torch.sigmoid(difference + offset).mean()) < target:
                low = offset
            else:
                high = offset
        out.bias.copy_(torch.tensor([offset / 2, -offset / 2]))

    # ---- scores ------------------------------------------------------------------------------------------------

    def keep_log_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        """Learned scorer: `[T,B,N,C]` -> log-probabilities `[B,N,2]` (column 0 = keep) from time-averaged spikes."""
        return self.mlp(tokens.mean(0))

    def scores(self, tokens: torch.Tensor, original_index: torch.Tensor) -> torch.Tensor:
        """Ranking score per token, `[B, N_current]`, higher = keep (no gradient)."""
        if self.scorer == "learned":
            return self.keep_log_probs(tokens)[..., 0]
        if self.scorer == "firing-rate":
            return tokens.mean(dim=(0, 3))
        batch = tokens.shape[1]
        full = torch.rand(batch, self.num_tokens, device=tokens.device)  # same draws whatever the mode
        return full.gather(1, original_index)

    # ---- forward -----------------------------------------------------------------------------------------------

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor | None = None):
        T, B, N, _ = tokens.shape
        if self.num_tokens is None:
            self.num_tokens = N
        original_index = self._original_index(tokens, keep)
        if self.training and self.scorer == "learned":
            return self._sample(tokens, keep, original_index)
        k = self.k()
        present = keep.bool() if keep is not None else torch.ones(B, N, dtype=torch.bool, device=tokens.device)
        available = int(present.sum(1).min())
        if k > available:
            raise SpkpruneError(
                f"the token selector before a block must keep {k} tokens but only {available} are left; "
                "use non-increasing cumulative keep ratios"
            )
        with torch.no_grad():
            score = self.scores(tokens, original_index).float().masked_fill(~present, float("-inf"))
            # A stable sort breaks ties by position, so a gathered subset (kept in order) chooses like the full set.
            chosen = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k].sort(dim=1).values
        self.last_kept = float(k)
        kept_original = original_index.gather(1, chosen)
        self.last_mask = _mask_from_index(kept_original, B, self.num_tokens)
        self.last_decision = self.last_mask.float()
        if self.mode == "gather" and not self.training:
            self.track.index = kept_original
            gathered = tokens.gather(2, chosen.view(1, B, k, 1).expand(T, B, k, tokens.shape[3]))
            return gathered, None
        new_keep = torch.zeros(B, N, dtype=torch.bool, device=tokens.device).scatter_(1, chosen, True)
        return tokens, new_keep

    def _sample(self, tokens: torch.Tensor, keep: torch.Tensor | None, original_index: torch.Tensor):
        """Training: hard Gumbel-softmax (tau 1), straight-through, multiplied by the previous decision."""
        B, N = tokens.shape[1], tokens.shape[2]
        if N != self.num_tokens:
            raise SpkpruneError("a learned token selector trains in mask mode only; an earlier selector gathered")
        log_probs = self.keep_log_probs(tokens)
        decision = F.gumbel_softmax(log_probs, tau=1.0, hard=True)[..., 0]  # [B, N], forward 0/1
        previous = keep.to(decision.dtype) if keep is not None else torch.ones_like(decision)
        decision = decision * previous
        new_keep = decision.detach() > 0.5
        self.last_decision = decision
        self.last_mask = new_keep
        self.last_kept = float(new_keep.sum(1).float().mean())
        gate = decision - decision.detach() + 1.0  # exactly 1 forward, d/dD = 1 backward
        return tokens * gate.view(1, B, N, 1), new_keep

    def _original_index(self, tokens: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        B, N = tokens.shape[1], tokens.shape[2]
        if N == self.num_tokens:  # first selector of a forward, or a masked chain
            index = torch.arange(N, device=tokens.device).expand(B, N)
            self.track.index = index
            return index
        if self.track.index is None or tuple(self.track.index.shape) != (B, N):
            raise SpkpruneError(
                f"token selector expected {self.num_tokens} tokens or the ones an earlier selector gathered; got {N}"
            )
        return self.track.index


def _mask_from_index(index: torch.Tensor, batch: int, num_tokens: int) -> torch.Tensor:
    return torch.zeros(batch, num_tokens, dtype=torch.bool, device=index.device).scatter_(1, index, True)


def _check_ratio(ratio: float) -> None:
    if not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise SpkpruneError(f"keep ratio {ratio!r} must lie in (0, 1]; e.g. --keep 0.7")


# ---- attaching to a model ---------------------------------------------------------------------------------------


def cumulative_keep(keep: float | list[float], locations: list[int]) -> list[float]:
    """Cumulative keep ratios per location: one ratio rho gives [rho, rho^2, rho^3, ...] (the reference code's
    KEEP_RATE); a list is taken as the cumulative ratios themselves and must be non-increasing."""
    if isinstance(keep, (int, float)):
        _check_ratio(keep)
        return [round(float(keep) ** (i + 1), 10) for i in range(len(locations))]
    ratios = [float(r) for r in keep]
    for ratio in ratios:
        _check_ratio(ratio)
    if len(ratios) == 1:
        return cumulative_keep(ratios[0], locations)
    if len(ratios) != len(locations):
        raise SpkpruneError(
            f"{len(ratios)} keep ratios for {len(locations)} selector locations; give one ratio or one per location"
        )
    if any(b > a for a, b in zip(ratios, ratios[1:])):
        raise SpkpruneError(f"cumulative keep ratios {ratios} must not increase from one location to the next")
    return ratios


def validate_selector(model: nn.Module, config: dict) -> dict:
    """The normalised configuration `{"locations", "keep", "scorer"}` (and `"action": "skip"` when skipping; drop is
    the default and not written, so configurations stored before skipping existed read the same); one clear
    SpkpruneError if it cannot work."""
    unknown = sorted(set(config) - {"locations", "keep", "scorer", "action"})
    if unknown:
        raise SpkpruneError(f"unknown token selector option(s): {', '.join(unknown)}")
    scorer = config.get("scorer", DEFAULT_SCORER)
    if scorer not in SCORERS:
        raise SpkpruneError(f"unknown token scorer {scorer!r}; choose one of {', '.join(SCORERS)}")
    action = config.get("action") or "drop"
    if action not in ACTIONS:
        raise SpkpruneError(f"unknown token action {action!r}; choose one of {', '.join(ACTIONS)}")
    allowed = model.selector_locations()
    depth = model.config.depth
    locations = config.get("locations") or allowed
    locations = [int(loc) for loc in locations]
    where = f"{model.name} ({getattr(model, 'family', type(model).__name__)} family)"
    rule = getattr(model, "selector_rule", "block 0 always sees every token")
    if not allowed and depth < 2:
        raise SpkpruneError(f"{where} has {depth} block(s): a token selector needs at least 2 blocks")
    if not allowed:
        raise SpkpruneError(f"{where} has no selector location: {rule}")
    bad = [loc for loc in locations if loc not in allowed]
    if bad:
        raise SpkpruneError(
            f"selector location(s) {bad} do not exist in {where}: choose among {allowed} "
            f"({rule}; the model has {depth} blocks)"
        )
    if len(set(locations)) != len(locations):
        raise SpkpruneError(f"selector locations {locations} repeat a block")
    locations = sorted(locations)
    n = model.num_tokens
    if n < 2:
        raise SpkpruneError(f"{model.name} has {n} token(s) per image: a token selector needs at least 2")
    keep = cumulative_keep(config.get("keep", 0.7), locations)
    for loc, ratio in zip(locations, keep):
        if tokens_kept(n, ratio) < 1:
            raise SpkpruneError(
                f"keep ratio {ratio:g} before block {loc} leaves 0 of {n} tokens; use a keep ratio >= {1 / n:.3g}"
            )
    return {"locations": locations, "keep": keep, "scorer": scorer, **({"action": action} if action != "drop" else {})}


def attach_selectors(model: nn.Module, config: dict) -> nn.Module:
    """Put a `TokenSelector` before each block in `config["locations"]` (replacing any there); returns `model`.

    `config` is `{"locations": [1, 2, 3], "keep": 0.7 | [0.7, 0.49, 0.343], "scorer": "learned"}` (what
    `selector_config` returns, and what checkpoint metadata stores under `meta["selector"]`).
    """
    config = validate_selector(model, config)
    device = next(model.parameters()).device
    track = _Track()
    model.token_selectors.clear()
    previous = 1.0
    for loc, ratio in zip(config["locations"], config["keep"]):
        selector = TokenSelector(model.token_dim, ratio, config["scorer"], model.num_tokens, ratio / previous,
                                 config.get("action", "drop"))
        previous = ratio
        selector.track = track
        model.token_selectors[str(loc)] = selector.to(device)
    return model


def detach_selectors(model: nn.Module) -> nn.Module:
    """Remove every token selector (the dense model again)."""
    model.token_selectors.clear()
    return model


def selector_config(model: nn.Module) -> dict | None:
    """`{"locations", "keep", "scorer"}` (and `"action": "skip"`) of the attached selectors, None for a dense model."""
    selectors = selectors_of(model)
    if not selectors:
        return None
    locations = sorted(selectors)
    first = selectors[locations[0]]
    config = {"locations": locations, "keep": [selectors[loc].keep_ratio for loc in locations], "scorer": first.scorer}
    return {**config, "action": first.action} if first.action != "drop" else config


def selectors_of(model: nn.Module) -> dict[int, TokenSelector]:
    """The attached selectors by block index, in order."""
    return {int(key): sel for key, sel in sorted(model.token_selectors.items(), key=lambda kv: int(kv[0]))}


def set_selector_mode(model: nn.Module, mode: str) -> nn.Module:
    for selector in selectors_of(model).values():
        selector.set_mode(mode)
    return model


def tokens_per_block(model: nn.Module) -> list[int]:
    """Tokens each block works on at inference (fixed counts: `int(N * ratio)` after each selector, whether the
    others were dropped or skip the block). `model.block_tokens()`, where a family has it, gives the dense counts
    (QKFormer's stages differ); else every block sees `num_tokens`."""
    selectors = selectors_of(model)
    counts, current = [], None
    for block, tokens in enumerate(dense_block_tokens(model)):
        if block in selectors:
            current = selectors[block].k(model.num_tokens)
        counts.append(tokens if current is None else current)
    return counts


class _Captured(Exception):
    """Stops a calibration forward pass once the selector being calibrated has seen its input."""


@torch.no_grad()
def warm_start_from_firing_rate(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """Start every learned selector of `model` as the firing-rate ranking (`TokenSelector.start_from_firing_rate`),
    calibrated on `images` so that its Gumbel keep probabilities average its conditional keep ratio
    (`TokenSelector.calibrate`). Calibration runs the model as training will (training-mode BatchNorm, earlier
    selectors sampling), one pass per selector, and leaves every buffer (BatchNorm statistics) as it was."""
    selectors = selectors_of(model)
    if not any(sel.has_weights for sel in selectors.values()):
        return model
    for selector in selectors.values():
        if selector.has_weights:
            selector.start_from_firing_rate()
    buffers = {name: buf.clone() for name, buf in model.named_buffers()}
    was_training = model.training
    model.train()
    try:
        previous = 1.0
        for selector in selectors.values():
            if selector.has_weights:
                tokens, keep = _selector_input(model, selector, images)
                selector.calibrate(tokens, keep, selector.keep_ratio / previous)
            previous = selector.keep_ratio
    finally:
        model.train(was_training)
        for name, buf in model.named_buffers():
            buf.copy_(buffers[name])
    return model


def _selector_input(model: nn.Module, selector: TokenSelector, images: torch.Tensor):
    seen = {}

    def capture(_module, args):
        seen["args"] = args
        raise _Captured

    hook = selector.register_forward_pre_hook(capture)
    try:
        model(images)
    except _Captured:
        pass
    finally:
        hook.remove()
    tokens, *rest = seen["args"]
    return tokens, rest[0] if rest else None


def last_kept(model: nn.Module) -> dict[int, float]:
    """Mean tokens kept per image by each selector in the last forward."""
    return {loc: sel.last_kept for loc, sel in selectors_of(model).items()}


__all__ = [
    "ACTIONS",
    "MODES",
    "SCORERS",
    "TokenSelector",
    "attach_selectors",
    "cumulative_keep",
    "detach_selectors",
    "last_kept",
    "selector_config",
    "selectors_of",
    "set_selector_mode",
    "tokens_kept",
    "tokens_per_block",
    "validate_selector",
    "warm_start_from_firing_rate",
]

"""Models from checkpoints: the preset (with its config overrides and token selectors), weights loaded strictly."""

from __future__ import annotations

import torch
from torch import nn

from spkprune.checkpoint.core import Checkpoint
from spkprune.checkpoint.sources import load_checkpoint
from spkprune.checkpoint.summary import natural_key
from spkprune.errors import SpkpruneError
from spkprune.models import (
    all_presets,
    check_same_family,
    check_state_dict_family,
    create_model,
    model_from_config,
)
from spkprune.models.selector import attach_selectors
from spkprune.store import Store

SELECTOR_PREFIX = "token_selectors."


def build_model(ckpt: Checkpoint, arch: str | None = None) -> nn.Module:
    """The model of `ckpt` with its weights loaded strictly (token selectors attached first when present).

    `arch` names the preset for a checkpoint without metadata (a plain state_dict): the `--arch` option.
    """
    where = ckpt.ref or "the checkpoint"
    arch = arch or ckpt.meta.get("arch")
    if not arch:
        raise SpkpruneError(f"{where} carries no architecture (a plain state_dict); pass --arch PRESET")
    model = _model_for(arch, ckpt.meta.get("config") if ckpt.meta.get("arch") == arch else None, where)
    selector = ckpt.meta.get("selector")
    if any(k.startswith(SELECTOR_PREFIX) for k in ckpt.state_dict) and not selector:
        raise SpkpruneError(f"{where} has token_selectors.* weights but no selector configuration in its metadata")
    if selector:  # firing-rate and random selectors have no weights: their configuration alone brings them back
        attach_selectors(model, selector)
    try:
        model.load_state_dict(ckpt.state_dict, strict=True)
    except SpkpruneError as err:
        check_state_dict_family(model, ckpt.state_dict, where)  # another family's weights: say so, in one line
        raise SpkpruneError(f"{where}: {err}") from None
    return model


def _model_for(arch: str, config: dict | None, where: str = "the checkpoint") -> nn.Module:
    """Preset `arch` with the stored `config`'s differences as overrides (a configuration of another family than
    the preset's is one error naming both); an unknown `arch` is built from `config` alone."""
    if arch not in all_presets() and config:
        return model_from_config(config, preset=arch)
    if not config:
        return create_model(arch)
    family = check_same_family(arch, config, where=f"the configuration stored in {where}")
    base = family.get_config(arch).to_dict()
    overrides = {k: v for k, v in config.items() if k not in base or base[k] != v}
    return family.create(arch, **overrides)


def model_from_ref(ref: str, store: Store | None = None, arch: str | None = None) -> nn.Module:
    """`build_model(load_checkpoint(ref, store))`."""
    return build_model(load_checkpoint(ref, store), arch=arch)


def prunable_keys(meta: dict) -> list[str] | None:
    """The prunable weight keys of `meta["arch"]` (a weightless skeleton on the meta device); None if unknown."""
    skeleton = _skeleton(meta)
    return None if skeleton is None else list(skeleton.prunable_weights())


def state_dict_keys(meta: dict) -> list[str] | None:
    """The state_dict keys of `meta`'s model in the model's own order (selectors included); None if unknown."""
    skeleton = _skeleton(meta, with_selector=True)
    return None if skeleton is None else list(skeleton.state_dict())


def in_model_order(ckpt: Checkpoint) -> Checkpoint:
    """`ckpt` with its tensors and masks in the model's state_dict order (other keys after, naturally sorted).

    A blob read from the store comes back in hash-map order; writers that follow the state_dict order give the
    same bytes for the same checkpoint only after this.
    """
    model_keys = state_dict_keys(ckpt.meta) or []
    known = set(model_keys)
    keys = [k for k in model_keys if k in ckpt.state_dict]
    keys += sorted((k for k in ckpt.state_dict if k not in known), key=natural_key)
    masks = {k: ckpt.masks[k] for k in keys if k in ckpt.masks}
    masks.update((k, mask) for k, mask in ckpt.masks.items() if k not in masks)  # writers report strays
    return Checkpoint({k: ckpt.state_dict[k] for k in keys}, masks, ckpt.meta, ckpt.ref)


def _skeleton(meta: dict, with_selector: bool = False) -> nn.Module | None:
    """A weightless model of `meta` on the meta device; None when `meta` names no buildable model."""
    if not meta.get("arch"):
        return None
    try:
        with torch.device("meta"):
            model = _model_for(meta["arch"], meta.get("config"))
            if with_selector and meta.get("selector"):
                attach_selectors(model, meta["selector"])
    except SpkpruneError:
        return None
    return model

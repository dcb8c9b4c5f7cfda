"""Where the report's model and data come from: a preset or any checkpoint reference, and a data set that fits."""

from __future__ import annotations

import difflib
import itertools
from pathlib import Path
from typing import Iterator

import torch.nn as nn

from spkprune.checkpoint import build_model, load_checkpoint
from spkprune.data import dataset_info, get_dataset, list_datasets, make_loader
from spkprune.errors import SpkpruneError
from spkprune.counting.structure import check_countable
from spkprune.models import create_model, list_models
from spkprune.store import is_store_ref, parse_ref


def load_model(ref: str, store) -> tuple[nn.Module, dict, str]:
    """(model, masks, source kind "preset" | "checkpoint") for a preset name or a checkpoint reference, of a family
    the counting covers (one line otherwise, before any data is read)."""
    presets = list_models()
    if ref in presets:
        model = create_model(ref)
        check_countable(model)
        return model, {}, "preset"
    try:
        ckpt = load_checkpoint(ref, store)
    except SpkpruneError as err:
        if "/" in ref or ref.endswith(".safetensors"):
            raise
        close = difflib.get_close_matches(ref, presets, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"presets: {', '.join(presets)}"
        raise SpkpruneError(f"{ref!r} is neither a preset ({hint}) nor a checkpoint: {err}") from None
    model = build_model(ckpt)
    check_countable(model)
    return model, dict(ckpt.masks), "checkpoint"


def is_stored(ref: str, store) -> bool:
    """True when `ref` names an artifact of `store` (the report can then be saved with it)."""
    if store is None or "/" in ref or not is_store_ref(ref):
        return False
    return store.exists(*parse_ref(ref))


def check_dataset_fits(model: nn.Module, name: str) -> None:
    """One clear error when data set `name` cannot feed `model` (channels, size, images vs events)."""
    cfg = model.config
    wants_events = cfg.variant == "dvs"

    def fits(info) -> bool:
        size_fits = info.img_size == cfg.img_size or (info.resizable and cfg.img_size < info.img_size)
        return size_fits and (info.in_channels, info.is_event) == (cfg.in_channels, wants_events)

    info = dataset_info(name)
    if fits(info):
        return
    fitting = [n for n in list_datasets() if fits(dataset_info(n))]
    kind = "event frames" if info.is_event else "images"
    expected = f"{'event frames' if wants_events else 'images'} {cfg.in_channels}x{cfg.img_size}x{cfg.img_size}"
    hint = f"use --dataset {' or '.join(fitting)}" if fitting else "no supported data set fits it"
    raise SpkpruneError(
        f"dataset {name} ({kind} {info.in_channels}x{info.img_size}x{info.img_size}) does not fit {model.name}, "
        f"which expects {expected}; {hint}"
    )


def dataset_batches(
    model: nn.Module, name: str, data_dir: str | Path | None, batches: int, batch_size: int
) -> Iterator:
    """The first `batches` test batches of data set `name`, checked against the model first."""
    if batches < 1 or batch_size < 1:
        raise SpkpruneError(f"--batches and --batch-size must be >= 1, got {batches} and {batch_size}")
    check_dataset_fits(model, name)
    info = dataset_info(name)
    timesteps = model.config.timesteps if info.is_event else None
    dataset = get_dataset(name, "test", data_dir=data_dir, timesteps=timesteps, img_size=model.config.img_size)
    return itertools.islice(make_loader(dataset, batch_size, train=False), batches)

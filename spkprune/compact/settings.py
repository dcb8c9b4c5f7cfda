"""The settings of `spkprune compact`, declared once (see spkprune.settings)."""

from __future__ import annotations

from spkprune.settings import Settings, option


class CompactSettings(Settings):
    """`spkprune compact`: cut out what the masks removed, into a smaller dense model with the same outputs."""

    ref: str = option(..., "Checkpoint with masks: NAME[@TAG], a .safetensors file, an exported folder or "
                      "hf://ORG/REPO.", argument=True, recipe="from", ref=True)
    name: str = option(..., "Name of the compacted model in the store (NAME@main).", identity=False)
    overwrite: bool = option(False, "Replace NAME@main if it already exists.", flag="--overwrite", recipe=None)

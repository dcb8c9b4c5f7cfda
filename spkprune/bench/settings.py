"""The settings of `spkprune bench`, declared once (see spkprune.settings)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import field_validator

from spkprune.settings import NonNegativeInt, PositiveInt, Settings, option

DEVICES = ("auto", "cpu", "cuda")


class BenchSettings(Settings):
    """`spkprune bench`: measured inference speed of checkpoints and presets, the first one the baseline."""

    refs: tuple[str, ...] = option(
        ..., "Checkpoints or presets to measure: NAME[@TAG], a .safetensors file, an exported folder, hf://ORG/REPO "
        "or a preset name (fresh weights). The first is the baseline of the speed-ups.",
        argument=True, repeat=True, ref=True, min_length=1,
    )
    batch_size: PositiveInt = option(32, "Images per batch for the throughput figure (latency is at batch 1).")
    repeats: PositiveInt = option(10, "Timed repeats per reference, interleaved across the references (p90 needs "
                                  "about 10).")
    warmup: NonNegativeInt = option(2, "Untimed warm-up repeats per reference (with --compile, compilation happens "
                                    "there).")
    threads: Optional[PositiveInt] = option(None, "CPU threads for PyTorch during the measurement (default: "
                                            "PyTorch's).")
    compile: bool = option(False, "Run every neuron through torch.compile's fused kernel (about 10 s to compile "
                           "per process, in the warm-up).")
    device: Literal[DEVICES] = option("auto", "Where to run: cuda when available (auto), cpu or cuda.")
    seed: int = option(0, "Seed of the random inputs.")
    save: Optional[bool] = option(None, "Store each result in its checkpoint's metadata (default: on for store "
                                  "references).", flag="--save/--no-save")

    @field_validator("refs")
    @classmethod
    def _distinct(cls, refs: tuple[str, ...]) -> tuple[str, ...]:
        seen = set()
        for ref in refs:
            if ref in seen:
                raise ValueError(f"{ref!r} is given twice; name each reference once")
            seen.add(ref)
        return refs

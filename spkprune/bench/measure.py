"""Timing inference: each reference on the fast inference path, warmed up, then timed in interleaved repeats (ref 1,
ref 2, ..., ref 1, ref 2, ...; every other repeat in reverse order) so that the machine's drift and load hit all of
them alike; after the timing, one throughput batch per reference for its peak memory."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn

from spkprune.bench.memory import model_megabytes, peak_growth_megabytes
from spkprune.bench.progress import BenchProgress
from spkprune.counting import count_operations
from spkprune.counting.sources import load_model
from spkprune.models.fastpath import prepare_for_inference


@dataclass
class Subject:
    """One reference, ready to run: its fast inference model on the device and its seeded random inputs."""

    ref: str
    kind: str  # "preset" | "checkpoint"
    model: nn.Module
    single: torch.Tensor  # batch 1, for latency
    batch: torch.Tensor  # batch_size, for throughput and memory
    timesteps: int
    dense_macs: float  # counted per image (x T), as `spkprune flops report` counts them
    nonzero_macs: float
    model_mb: float


@dataclass
class Timings:
    """Seconds per call at batch 1 and at the throughput batch, one of each per repeat; MiB of the memory pass."""

    latency_s: list[float] = field(default_factory=list)
    batch_s: list[float] = field(default_factory=list)
    peak_growth_mb: float | None = None


def random_inputs(config, batch_size: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded uniform inputs of the model's shape: images [B,C,H,W], or event frames [B,T,C,H,W] for DVS models."""
    shape = (batch_size, config.in_channels, config.img_size, config.img_size)
    if config.variant == "dvs":
        shape = (batch_size, config.timesteps, *shape[1:])
    batch = torch.rand(shape, generator=torch.Generator().manual_seed(seed)).to(device)
    return batch[:1].clone(), batch


def load_subject(ref: str, store, *, batch_size: int, seed: int, device: torch.device, compile: bool) -> Subject:
    """Load `ref` (a preset gets fresh weights), count its operations and prepare it for fast inference."""
    model, masks, kind = load_model(ref, store)
    totals = count_operations(model, masks=masks)["totals"]
    fast = prepare_for_inference(model.to(device), compile=compile)
    single, batch = random_inputs(model.config, batch_size, seed, device)
    return Subject(
        ref=ref, kind=kind, model=fast, single=single, batch=batch, timesteps=model.config.timesteps,
        dense_macs=totals["dense_macs"], nonzero_macs=totals["nonzero_macs"], model_mb=model_megabytes(fast),
    )


def timed_call(model: nn.Module, inputs: torch.Tensor) -> float:
    """Seconds of one forward under `torch.inference_mode` (waiting for the GPU, if any)."""
    cuda = inputs.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(inputs.device)
    start = time.perf_counter()
    with torch.inference_mode():
        model(inputs)
    if cuda:
        torch.cuda.synchronize(inputs.device)
    return time.perf_counter() - start


def measure(subjects: list[Subject], *, repeats: int, warmup: int, progress: bool = True) -> list[Timings]:
    """Warm-up, interleaved timed repeats, then the memory pass; one `Timings` per subject, in order."""
    bar = BenchProgress(progress, (warmup + repeats + 1) * len(subjects))
    timings = [Timings() for _ in subjects]
    try:
        for _ in range(warmup):
            for subject in subjects:
                timed_call(subject.model, subject.single)
                timed_call(subject.model, subject.batch)
                bar.step("warm-up", subject.ref)
        for repeat in range(repeats):
            order = list(range(len(subjects)))
            for index in order if repeat % 2 == 0 else reversed(order):
                subject = subjects[index]
                timings[index].latency_s.append(timed_call(subject.model, subject.single))
                timings[index].batch_s.append(timed_call(subject.model, subject.batch))
                bar.step(f"repeat {repeat + 1}/{repeats}", subject.ref)
        for subject, timing in zip(subjects, timings):
            one_batch = partial(timed_call, subject.model, subject.batch)
            timing.peak_growth_mb = peak_growth_megabytes(one_batch, subject.batch.device)
            bar.step("peak memory", subject.ref)
    finally:
        bar.close()
    return timings

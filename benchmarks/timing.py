"""Timing and machine helpers: warm-up, interleaved repeats, medians; a description of the machine."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

import torch


def interleaved(cases: dict[str, Callable[[], None]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each case, the cases alternating within every repeat so that machine load hits all alike."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(repeats):
        order = list(cases) if r % 2 == 0 else list(reversed(cases))  # no case always runs right after another
        for name in order:
            start = time.perf_counter()
            cases[name]()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median of the per-repeat ratios (each pair ran back to back, so it shares the machine's load)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, str]:
    import spikingjelly  # noqa: F401  (version below)
    from importlib.metadata import version

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpu": cpu_model(),
        "logical cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "spikingjelly": version("spikingjelly"),
        "os": f"{platform.system()} {platform.release()}",
        "load average at start (1/5/15 min)": " / ".join(f"{x:.2f}" for x in load),
    }

"""The machine a measurement ran on: CPU model, cores, threads, versions and the accelerator, if any."""

from __future__ import annotations

import os
import platform

import torch

from spkprune.errors import SpkpruneError
from spkprune.version import __version__


def pick_device(name: str) -> torch.device:
    """`auto`: cuda when available, else cpu; `cuda` without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SpkpruneError("--device cuda: no CUDA device is available here; use --device cpu")
    return torch.device(name)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info(device: torch.device) -> dict:
    """What the figures depend on: CPU, logical cores, PyTorch's threads, versions, OS and the device."""
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "spkprune": __version__,
        "device": device.type,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def describe(info: dict) -> str:
    """One line for people: `AMD EPYC, 2 cores, 1 torch thread, torch 2.4.1, cpu`."""
    threads = info.get("torch_threads")
    where = info.get("gpu") or info.get("device")
    return (f"{info.get('cpu')}, {info.get('cores')} cores, {threads} torch thread{'s' if threads != 1 else ''}, "
            f"torch {info.get('torch')}, {where}")

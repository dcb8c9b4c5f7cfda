"""Peak memory of one inference call, on top of what was resident before it.

- CUDA: `torch.cuda.max_memory_allocated` after resetting the peak, minus what was allocated before the call.
- CPU (Linux): the growth of the process's peak resident set (VmHWM in /proc/self/status) over its resident set
  (VmRSS) just before the call. The heap's free memory is first handed back to the system (glibc's `malloc_trim`)
  and the peak is reset (`5` into /proc/self/clear_refs), so the figure is what this call touched: its activations
  and temporaries, including pages of the allocator it reused. Where the peak cannot be reset (not Linux, or the
  kernel refuses) there is no figure (None).

tracemalloc does not see PyTorch's CPU allocations, which is why the kernel's counters are read instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Callable

import torch

CPU_METHOD = ("CPU: weights + peak resident-set growth of one throughput batch (VmHWM over VmRSS after malloc_trim "
              "and a reset of the peak)")
CUDA_METHOD = "CUDA: weights + torch.cuda.max_memory_allocated growth of one throughput batch"
_MB = 2**20


def method(device: torch.device) -> str:
    return CUDA_METHOD if device.type == "cuda" else CPU_METHOD


def model_megabytes(model: torch.nn.Module) -> float:
    """Bytes of the model's parameters and buffers, in MiB."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / _MB


def peak_growth_megabytes(call: Callable[[], None], device: torch.device) -> float | None:
    """MiB that `call()` needed on top of what was in use before it (None where it cannot be measured)."""
    if device.type == "cuda":
        return _cuda_growth(call, device)
    return _cpu_growth(call)


def _cuda_growth(call: Callable[[], None], device: torch.device) -> float:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    call()
    torch.cuda.synchronize(device)
    return max(0, torch.cuda.max_memory_allocated(device) - before) / _MB


def _cpu_growth(call: Callable[[], None]) -> float | None:
    _trim_heap()
    if not _reset_peak():
        return None
    before = _status_kib("VmRSS")
    call()
    peak = _status_kib("VmHWM")
    if before is None or peak is None:
        return None
    return max(0, peak - before) / 1024


def _trim_heap() -> None:
    """Hand the heap's free pages back to the system (glibc), so that reuse of them counts as growth."""
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass  # not glibc: nothing to trim


def _reset_peak() -> bool:
    """Set the peak resident set to the current one (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None

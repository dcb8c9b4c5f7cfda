"""Peak memory of training steps, measured in a fresh process: `python -m benchmarks.memory PRESET BATCH PATH [STEPS]`
(PATH: plain, fast or "fast compiled").

Prints one JSON line: `base_mb` (max RSS once model, optimizer state and data exist), `peak_mb` (max RSS after the
training steps) and `step_mb` (their difference: what the steps needed on top: activations saved for backward,
gradients, temporaries). tracemalloc does not see torch's CPU allocations; the kernel's peak RSS (VmHWM) does. The
benchmark runs it with `MALLOC_MMAP_THRESHOLD_=1048576` (see `benchmarks.run.memory_env`), so that freed tensors go
back to the system and the peak measures live tensors, not heap fragmentation.
"""

from __future__ import annotations

import json
import resource
import sys

import torch


def max_rss_mb() -> float:
    """This process's peak resident set size. Linux's `ru_maxrss` carries the parent's peak across fork + exec (so a
    child of a big benchmark process starts "at" the parent's peak); `VmHWM` belongs to the new address space."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def warm_up(step) -> None:
    """Forward and backward on two images, so that one-off costs (imports, torch.compile of the fused kernels: two
    images, since size-1 dimensions would be specialised) land in the baseline and not in the step, for every path."""
    import torch.nn.functional as F

    F.cross_entropy(step.net(step.images[:2]), step.targets[:2]).backward()
    step.model.zero_grad(set_to_none=True)


def main(argv: list[str]) -> None:
    from benchmarks.cases import training_setup

    preset, batch, path, steps = argv[0], int(argv[1]), argv[2], int(argv[3]) if len(argv) > 3 else 2
    step = training_setup(preset, batch, path)
    warm_up(step)
    step.prime()  # optimizer state exists before the baseline is read
    base = max_rss_mb()
    for _ in range(steps):
        step()
    print(json.dumps({"base_mb": base, "peak_mb": max_rss_mb(), "step_mb": max_rss_mb() - base}))


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main(sys.argv[1:])

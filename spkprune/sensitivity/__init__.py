"""Sensitivity scans (`spkprune sensitivity`): prune one layer, structure layer or selector location at a time and
measure the accuracy it costs, and the allocations drawn from a stored scan (`allocation.py`: per-layer sparsities for
`imp --allocation sensitivity`, per-location keep ratios for `select-tokens --keep-allocation sensitivity`).

This package's `__init__` imports nothing: `pruning` and `selection` import `sensitivity.allocation`, and the scan
(`scan.py`, `jobs.py`) imports them in turn.
"""

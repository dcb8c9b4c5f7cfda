"""spkprune benchmarks: `python -m benchmarks [--quick]` measures this machine and writes docs/benchmarks.md."""

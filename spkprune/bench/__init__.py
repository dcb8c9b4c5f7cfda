"""Measured inference speed (`spkprune bench`): latency, throughput and peak memory on the fast inference path,
beside the counted MACs, with speed-ups against the first reference (see docs/performance.md)."""

from spkprune.bench.jobs import run_bench
from spkprune.bench.report import BenchReport, RefResult
from spkprune.bench.settings import BenchSettings

__all__ = ["BenchReport", "BenchSettings", "RefResult", "run_bench"]

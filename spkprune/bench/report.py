"""The result of `spkprune bench`: one row per reference, the machine, and what each figure means."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

from spkprune.bench.measure import Subject, Timings

SPEEDUP_NOTE = "speedup: throughput over the first reference's (the baseline)"


@dataclass(frozen=True)
class RefResult:
    """Measured and counted figures of one reference. Latency is per image at batch 1; throughput is images/s at
    the throughput batch (median over repeats); MACs are counted per image (x T)."""

    ref: str
    kind: str
    timesteps: int
    batch_size: int
    latency_ms: float  # median
    latency_p90_ms: float
    throughput: float
    speedup: float
    peak_memory_mb: float | None  # weights + the peak growth of one throughput batch
    model_mb: float
    dense_macs: float
    nonzero_macs: float
    saved_to: str | None = None  # NAME@TAG whose metadata holds this result

    def row(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class BenchReport:
    results: list[RefResult]
    machine: dict
    settings: dict  # batch_size, repeats, warmup, threads, compile, device, seed
    memory_method: str
    measured_at: str
    notes: list[str] = field(default_factory=list)

    @property
    def baseline(self) -> str:
        return self.results[0].ref

    def rows(self) -> list[dict]:
        return [result.row() for result in self.results]

    def summary(self) -> dict:
        """Everything but the rows: the JSON document's other keys, the lines under the table."""
        return {"baseline": self.baseline, "machine": self.machine, "settings": self.settings,
                "peak_memory": self.memory_method, "measured_at": self.measured_at, "notes": self.notes}

    def stored_entry(self, index: int) -> dict:
        """What `meta["bench"]` of reference `index` keeps: its figures, how and where they were measured, and the
        references it was compared with."""
        row = {k: v for k, v in self.results[index].row().items() if k != "saved_to"}
        return {**row, "baseline": self.baseline, "compared_with": [r.ref for r in self.results],
                "machine": self.machine, "settings": self.settings, "peak_memory": self.memory_method,
                "measured_at": self.measured_at}


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile with linear interpolation between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def ref_results(subjects: list[Subject], timings: list[Timings], batch_size: int) -> list[RefResult]:
    """Medians and p90 of the timings; speed-ups against the first subject's throughput."""
    throughputs = [batch_size / statistics.median(t.batch_s) for t in timings]
    results = []
    for subject, timing, throughput in zip(subjects, timings, throughputs):
        growth = timing.peak_growth_mb
        results.append(RefResult(
            ref=subject.ref, kind=subject.kind, timesteps=subject.timesteps, batch_size=batch_size,
            latency_ms=1000 * statistics.median(timing.latency_s),
            latency_p90_ms=1000 * percentile(timing.latency_s, 90),
            throughput=throughput, speedup=throughput / throughputs[0],
            peak_memory_mb=None if growth is None else subject.model_mb + growth, model_mb=subject.model_mb,
            dense_macs=subject.dense_macs, nonzero_macs=subject.nonzero_macs,
        ))
    return results

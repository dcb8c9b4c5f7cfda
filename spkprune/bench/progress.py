"""A rich progress bar on stderr for the warm-up, the timed repeats and the memory pass."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class BenchProgress:
    """One bar over every call of the run; a no-op unless `enabled`."""

    def __init__(self, enabled: bool, total: int):
        self.enabled = enabled
        if not enabled:
            return
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(bar_width=30), MofNCompleteColumn(),
            TextColumn("{task.fields[ref]}"), TimeElapsedColumn(), console=Console(stderr=True), transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("warm-up", total=total, ref="")

    def step(self, phase: str, ref: str) -> None:
        if self.enabled:
            self.progress.update(self.task, advance=1, description=phase, ref=ref)

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()

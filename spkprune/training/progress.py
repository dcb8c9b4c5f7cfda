"""Rich progress bars on stderr: one for epochs, one for the batches of the current epoch."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    """A no-op unless `enabled` (progress off, or not the main process)."""

    def __init__(self, enabled: bool, total_epochs: int, start_epoch: int):
        self.enabled = enabled
        if not enabled:
            return
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self.progress.start()
        self.epochs = self.progress.add_task("epochs", total=total_epochs, completed=start_epoch, stats="")
        self.batches = self.progress.add_task("batches", total=0, stats="")

    def start_epoch(self, epoch: int, num_batches: int) -> None:
        if self.enabled:
            self.progress.reset(self.batches, total=num_batches, description=f"epoch {epoch}", stats="")

    def batch(self, loss: float, acc: float, images_per_s: float, lr: float) -> None:
        if self.enabled:
            stats = f"loss {loss:.4f}  acc {acc:.2%}  {images_per_s:,.0f} img/s  lr {lr:.2e}"
            self.progress.update(self.batches, advance=1, stats=stats)

    def end_epoch(self, metrics: dict) -> None:
        if self.enabled:
            parts = [f"train loss {metrics['train_loss']:.4f}", f"train acc {metrics['train_acc']:.2%}"]
            if "top1" in metrics:
                parts.append(f"test top1 {metrics['top1']:.2%}")
            self.progress.update(self.epochs, advance=1, stats="  ".join(parts))

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()

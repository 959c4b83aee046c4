"""A rich progress bar for one training run: epoch, step, loss, throughput, test accuracy.

The run's label holds a user's values (a norm's name), so it is cleaned and shown as
text (:mod:`normbench.terminal`), never as markup."""

from __future__ import annotations

from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from normbench import terminal


class RunProgress:
    """The training loop's callbacks, drawn as one bar over all the run's steps."""

    def __init__(self, label: str, console: terminal.Console | None = None):
        self.label = terminal.clean(label)
        self.progress = Progress(
            TextColumn("{task.description}", style="bold", markup=False),
            TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}", markup=False),
            BarColumn(bar_width=None),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f} {task.fields[img_s]:,.0f} img/s"),
            TextColumn("test {task.fields[test_acc]}"),
            TimeRemainingColumn(),
            console=console or terminal.Console(stderr=True),
            expand=True,
        )
        self.task = None

    def __enter__(self) -> RunProgress:
        # The bar appears with the first report, so a run refused before training draws nothing.
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def on_start(self, total_steps: int, epochs: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task(
            self.label,
            total=total_steps,
            epoch=1,
            epochs=epochs,
            loss=float("nan"),
            img_s=0.0,
            test_acc="-",
        )

    def on_step(self, step: int, epoch: int, loss: float, img_per_s: float) -> None:
        self.progress.update(self.task, completed=step, epoch=epoch, loss=loss, img_s=img_per_s)

    def on_epoch(self, record: dict[str, Any]) -> None:
        self.progress.update(self.task, test_acc=f"{100 * record['test_acc']:.2f}%")

"""A rich progress bar for one training run: epoch, step, loss, throughput, test accuracy.

The run's label holds a user's values (a norm's name), so it is cleaned and shown as
text (:mod:`normbench.terminal`), never as markup. :class:`Progress` is the rich progress
display every normbench command draws (a run's, a sweep's, bench's)."""

from __future__ import annotations

from typing import Any

import rich.progress
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeRemainingColumn,
)

from normbench import terminal


class Progress(rich.progress.Progress):
    """rich's progress display, whose stop writes no blank line. Off a terminal (a pipe, a
    file, a SLURM log) rich writes the display's last state once as it stops (a log keeps
    how far a run got), without ending its line; its ``Progress.stop`` then prints a line
    break, which is a blank line when nothing was drawn: before an error refused at once,
    that made the error two lines. Here the line break comes only after a drawn state."""

    def stop(self) -> None:
        if self.disable:
            return
        drawn = self.live.is_started and any(task.visible for task in self.tasks)
        self.live.stop()
        console = self.console
        # a terminal (dumb ones too) ends the line in Live.stop; a transient display
        # writes nothing off a terminal
        if drawn and not (console.is_terminal or console.is_jupyter or self.live.transient):
            console.line()


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

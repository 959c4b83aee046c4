"""Every progress display normbench draws: a run's bar, a sweep's runs with an ETA and
each in-process run's bar, and bench's rounds.

Labels hold a user's values (a norm's name), so they are cleaned and shown as text
(:mod:`normbench.terminal`), never as markup. :class:`Progress` is the rich progress
display every one of them draws in. The commands' modules define what they report
(``train.Callbacks``, :class:`normbench.sweep.SweepDisplay`, :class:`normbench.bench.Progress`);
the classes here draw it."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import rich.progress
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeRemainingColumn,
)

from normbench import terminal

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text


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


class RichProgress:
    """A :class:`Progress` drawn with rich: a spinner with the phase, and a bar over the rounds."""

    def __init__(self, console: Console | None = None):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            SpinnerColumn,
            TextColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console or terminal.Console(stderr=True),
            transient=True,
        )
        self.task = self.progress.add_task("starting", total=None)

    def __enter__(self) -> RichProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def status(self, message: str) -> None:
        self.progress.update(self.task, description=message)

    def start(self, total: int) -> None:
        self.progress.update(self.task, total=total, completed=0)

    def advance(self) -> None:
        self.progress.advance(self.task)

    def note(self, message: str | Text) -> None:
        self.progress.console.print(message)


class SweepProgress:
    """Runs done / total with an ETA (:mod:`normbench.eta`: from the run folders, so it
    works for every launcher), and each in-process run's own bar."""

    def __init__(self, sweep_plan, console=None, poll_s: float = 1.0):
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

        from normbench.eta import SweepEta

        self.plan = sweep_plan
        done = [job for job in sweep_plan.jobs if sweep_plan.skipped(job)]
        self.eta = SweepEta(sweep_plan.to_run, done_before=done)
        self.console = console or terminal.Console(stderr=True)
        self.progress = Progress(
            # descriptions hold a user's values (norm names): text, never markup
            TextColumn("{task.description}", style="bold", markup=False),
            BarColumn(bar_width=None),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TimeElapsedColumn(),
            _eta_column(),
            console=self.console,
            expand=True,
        )
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> SweepProgress:
        self.total = self.progress.add_task(
            "sweep", total=len(self.plan.to_run), unit="runs", eta=_clock(None)
        )
        self.progress.start()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._refresh()
        self.progress.stop()

    def _refresh(self) -> None:
        # The poll thread and a finishing in-process run both refresh: one at a time, as
        # the ETA keeps what it has read (each summary is read once, for both figures).
        with self._lock:
            left = self.eta.seconds_left()
            self.progress.update(self.total, completed=self.eta.finished, eta=_clock(left))

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._refresh()

    @contextlib.contextmanager
    def run_display(self, cfg) -> Iterator[Any]:
        """A bar for one run drawn inside the sweep's display; removed when it ends."""
        from normbench.terminal import clean

        label = clean(f"{cfg.norm.name} bs={cfg.batch_size} seed={cfg.seed}")
        bar = _RunBar(self.progress, label)
        try:
            yield bar
        finally:
            if bar.task is not None:
                self.progress.remove_task(bar.task)
            self._refresh()


def _eta_column():
    from rich.progress import ProgressColumn
    from rich.text import Text

    class EtaColumn(ProgressColumn):
        """The sweep's ETA from its ``eta`` field (:mod:`normbench.eta`); a run's bar,
        whose steps come steadily, from rich's own rate of steps."""

        def render(self, task) -> Text:
            eta = task.fields.get("eta") or _clock(task.time_remaining)
            return Text(f"eta {eta}", style="progress.remaining")

    return EtaColumn()


def _clock(seconds: float | None) -> str:
    """Seconds as H:MM:SS, as rich shows times; ``-:--:--`` while there is no estimate."""
    if seconds is None:
        return "-:--:--"
    whole = round(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


class _RunBar:
    """One run's steps, as a task of the sweep's progress display (``train.Callbacks``)."""

    def __init__(self, progress, label: str):
        self.progress, self.label, self.task = progress, label, None
        self.epochs = 0

    def on_start(self, total_steps: int, epochs: int) -> None:
        self.epochs = epochs
        self.task = self.progress.add_task(self.label, total=total_steps, unit="steps")

    def on_step(self, step: int, epoch: int, loss: float, img_per_s: float) -> None:
        description = f"{self.label} · epoch {epoch}/{self.epochs} · loss {loss:.3f}"
        self.progress.update(self.task, completed=step, description=description)

    def on_epoch(self, record: dict[str, Any]) -> None:
        pass

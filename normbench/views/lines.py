"""What the commands print besides tables and progress: a run's outcome, a sweep's plan
and counts, what an interruption left behind, the results of ``check-norm`` and the
options of ``list``. Each function returns what to print (text, or a rich renderable);
:mod:`normbench.cli` prints it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from normbench import terminal


def run_label(cfg) -> str:
    """A run's label on its progress bar: its norm and batch size."""
    return f"{cfg.norm.name} bs={cfg.batch_size}"


def run_stopped(reason: str | None, recorded: bool, resumable: bool = False) -> str:
    """What became of a run stopped by ``reason`` (Ctrl-C, a signal); ``resumable``: its
    folder keeps a checkpoint, which the same command goes on from."""
    if recorded:
        again = (
            "resumes it after its last finished epoch"
            if resumable
            else "runs it again from the start"
        )
        return (
            f"{reason}: the run is recorded as interrupted and counts as not done; "
            f"the same command again {again}"
        )
    return (
        f"{reason}: stopped before the run trained; nothing of it is "
        "recorded, the same command again runs it"
    )


def run_outcome(outcome) -> list[Any]:
    """A finished run's lines (a ``runner.RunOutcome``): skipped or not, then its test
    accuracy (at the best validation epoch too) or why it diverged, and its folder."""
    summary, where = outcome.summary, outcome.run_dir
    lines: list[Any] = []
    if outcome.skipped:
        lines.append(f"already done ({summary['status']}), skipped; --force reruns it")
    if summary["status"] == "diverged":
        lines.append(terminal.styled(("diverged", "yellow"), f": {summary['error']} · {where}"))
        return lines
    chosen = summary.get("test_acc_at_best_val")
    at_best = (
        f" ({100 * chosen:.2f}% at the best validation epoch, {summary['best_val_epoch']})"
        if chosen is not None
        else ""
    )
    lines.append(f"test acc {100 * summary['final_test_acc']:.2f}%{at_best} · {where}")
    return lines


def sweep_plan(plan) -> list[str]:
    """A planned sweep (a ``sweep.Plan``) in a line: runs, duplicates dropped, done, in
    progress elsewhere, to run; then up to three of the runs owned elsewhere."""
    skipped = len(plan.jobs) - len(plan.to_run) - len(plan.elsewhere)
    elsewhere = f", {len(plan.elsewhere)} in progress elsewhere" if plan.elsewhere else ""
    twice = plan.duplicates
    dropped = (
        f" ({twice} duplicate grid point{'s' if twice > 1 else ''} dropped: the same run as "
        "another)"
        if twice
        else ""
    )
    lines = [
        f"sweep: {terminal.plural(len(plan.jobs), 'run')}{dropped}, {skipped} already "
        f"done{elsewhere}, {len(plan.to_run)} to run"
    ]
    lines += [f"  {job.run_id}: {job.busy.describe()}" for job in plan.elsewhere[:3]]
    return lines


def sweep_stopped(plan, reason: str | None) -> str:
    """What became of a sweep stopped by ``reason``: its SLURM jobs left running, or its
    jobs cancelled, or its runs stopped."""
    if plan.left_running:
        left = plan.left_running
        jobs = f"{len(left)} SLURM job{'s' if len(left) > 1 else ''}"
        return (
            f"{reason}: the sweep left its {jobs} running "
            f"({', '.join(left[:8])}{', ...' if len(left) > 8 else ''}); the same sweep "
            "again leaves the runs they have to them and redoes only what is not done"
        )
    if plan.cancelled:
        jobs = terminal.plural(len(plan.cancelled), "job")
        what = f"cancelled {jobs} ({', '.join(plan.cancelled[:8])}"
        what += ", ...)" if len(plan.cancelled) > 8 else ")"
    else:
        what = "stopped its runs"
    return (
        f"{reason}: the sweep {what}; finished runs are kept and stopped ones "
        "are recorded as interrupted; the same sweep again redoes only what is not done"
    )


#: The outcomes a sweep's last line counts, in order.
SWEEP_OUTCOMES = (
    "completed",
    "skipped",
    "diverged",
    "failed",
    "interrupted",
    "running elsewhere",
    "not run",
)


def sweep_counts(counts: Mapping[str, int]) -> str:
    """How a sweep's jobs ended, in a line (completed and failed always shown)."""
    return ", ".join(
        f"{counts[status]} {status}"
        for status in SWEEP_OUTCOMES
        if counts[status] or status in ("completed", "failed")
    )


def checks_table(target: str, results: Sequence[Any]):
    """``check-norm``'s results (``checknorm.Check``) as a table: check, passed or
    FAILED, detail."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"normbench check-norm {target}")
    table.add_column("check", style="bold")
    table.add_column("result")
    table.add_column("detail")
    for result in results:
        mark = Text("passed", "green") if result.passed else Text("FAILED", "bold red")
        table.add_row(result.name, mark, result.detail)
    return table


def options_table(groups: Mapping[str, Sequence[tuple[str, str]]], defaults: Mapping[str, Any]):
    """``list``'s table: every config group's options with their descriptions, the
    default marked."""
    from rich.table import Table

    table = Table(title="config groups: pick an option with group=option (* the default)")
    table.add_column("group", style="bold")
    table.add_column("option", style="cyan")
    table.add_column("description")
    for group, options in groups.items():
        for i, (option, description) in enumerate(options):
            marker = " *" if defaults.get(group) == option else ""
            table.add_row(group if i == 0 else "", option + marker, description)
        table.add_section()
    return table

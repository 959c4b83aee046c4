"""Every rich table normbench prints, and the lines of text around them: an experiment's
summary, estimator and selection tables with their flags' warning lines, the same
tables as Markdown, LaTeX or CSV text (``results --format``, report.md), run counts and
skipped folders, and bench's timings.

Keys, values and titles come from run folders or a user: they are shown as text, cleaned
(:mod:`normbench.terminal`), never as markup.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from normbench import terminal
from normbench.analysis.collect import Collected
from normbench.analysis.stats import selection_keys
from normbench.rundir import STATUSES
from normbench.terminal import plural
from normbench.views.text import format_value, short_key


def _percent(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "–"
    return f"{100 * mean:.2f}" if math.isnan(std) else f"{100 * mean:.2f} ± {100 * std:.2f}"


def _interval(mean: float, half: float) -> str:
    """An accuracy's 95% interval in %, clipped to what an accuracy can be: [0, 100]."""
    if math.isnan(mean) or math.isnan(half):
        return "–"
    low, high = max(mean - half, 0.0), min(mean + half, 1.0)
    return f"[{100 * low:.2f}, {100 * high:.2f}]"


def budget_text(runs: pd.DataFrame) -> str | None:
    """What the runs held fixed across batch sizes, for a table's caption: epochs or
    optimizer steps (``budget``, ``max_steps``)."""

    def values(key: str) -> list:
        column = runs.get(key, runs.get(f"config.{key}"))
        return [] if column is None else sorted(column.dropna().unique().tolist(), key=str)

    steps, budget = values("max_steps"), values("budget")
    epochs, reference = values("epochs"), values("ref_batch_size")
    if steps:
        return f"budget: {', '.join(map(str, steps))} optimizer steps at every batch size"
    if budget == ["steps"]:
        return (
            f"budget: the optimizer steps of {', '.join(map(str, epochs))} epochs at batch size "
            f"{', '.join(map(str, reference))}, at every batch size (steps held fixed)"
        )
    if budget in (["epochs"], []):
        return (
            f"budget: {', '.join(map(str, epochs))} epochs at every batch size (epochs held fixed)"
        )
    return "budget: mixed (epochs and steps held fixed in different runs)"


#: How the rich tables mark a flag (the ``flags`` column's names are long); the warning
#: line under the table gives both.
FLAG_MARKS: dict[str, str] = {
    "lr_at_edge": "edge",
    "stale_running_stats": "stale",
    "renorm_ramp_not_reached": "ramp",
    "under_trained": "under",
    "no_variance": "novar",
    "few_seeds": "few",
}


def _whole_words(table) -> Any:
    """``table`` with every column at least as wide as its longest word (header and
    cells): a narrow terminal wraps its cells between words (``[96.23,`` over
    ``99.88]``), never inside a number."""
    for column in table.columns:
        texts = [str(column.header), *map(str, column.cells)]
        longest = max((len(word) for text in texts for word in text.split()), default=0)
        column.min_width = max(column.min_width or 0, longest)
    return table


def _table(title: str):
    from rich import box
    from rich.table import Table

    return Table(
        title=terminal.text(title, "table.title"),
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )


def _compared_with(frame: pd.DataFrame, keys: Sequence[str]):
    """The baseline norm ``frame``'s rows are compared with, when its table has the norm
    among its keys (None: no comparison columns)."""
    baselines = frame["baseline"].dropna().unique() if "baseline" in frame else []
    return baselines[0] if len(baselines) and "norm.name" in keys else None


def summary_table(
    summary: pd.DataFrame, keys: Sequence[str], title: str, caption: str | None = None
):
    """A rich Table of :func:`~normbench.analysis.stats.group_stats`'s frame grouped by
    ``keys``: the key columns, n,
    the final test accuracy in percent (mean ± std over the completed runs) and the 95%
    CI of its mean as [low, high]; with one run there is no std or CI, with none "–". With
    a baseline variant, the difference to it (percentage points ± 95% CI), p, Holm's p
    and the test they come from. Diverged and failed counts get columns when any run
    did, flags when any row has one (:data:`FLAG_MARKS`). (Best accuracies are in
    summary.csv; the table stays narrow enough for a terminal.) Keys, values and the
    title come from run folders: they are shown as text, cleaned (:mod:`normbench.terminal`)."""
    table = _table(title)
    _key_columns(table, summary, keys)
    if not keys:
        table.add_column("runs", style="bold")
    table.add_column("n", justify="right", no_wrap=True, min_width=len(str(summary["n"].max())))
    # what wraps when the terminal is narrow
    table.add_column("final acc %", justify="right")
    table.add_column("95% CI", justify="right")
    baseline = _compared_with(summary, keys)
    if baseline is not None:
        shown = format_value(baseline)
        _comparison_columns(table, shown)
        caption = (f"{caption}; " if caption else "") + comparison_caption(shown)
    table.caption = terminal.text(caption, "table.caption") if caption else None
    counted = ("n_diverged", "n_failed", "n_interrupted")
    extra = [c for c in counted if c in summary and summary[c].sum() > 0]
    for column in extra:
        table.add_column(column.removeprefix("n_"), justify="right", style="yellow")
    flagged = _has_flags(summary)
    if flagged:
        _flags_column(table)
    for row in summary.to_dict("records"):
        cells = [terminal.text(_cell(k, row[k])) for k in keys] or ["all"]
        cells += [
            str(row["n"]),
            _percent(row["final_test_acc_mean"], row["final_test_acc_std"]),
            _interval(row["final_test_acc_mean"], row["final_test_acc_ci95"]),
        ]
        if baseline is not None:
            cells += _comparison_cells(row, baseline)
        cells += [str(row[c]) for c in extra]
        if flagged:
            cells.append(marks(row.get("flags")))
        table.add_row(*cells)
    return _whole_words(table)


def _key_columns(table, frame: pd.DataFrame, keys: Sequence[str], tuned=()) -> None:
    """A column per key; keys are never cut short: the numbers beside them wrap instead."""
    for key in keys:
        numeric = key in frame and _numeric(frame, key)
        width = max(
            [len(terminal.clean(short_key(key)))]
            + [len(terminal.clean(_cell(key, v))) for v in frame.get(key, [])]
        )
        table.add_column(
            terminal.text(short_key(key)),
            style="bold cyan" if key in tuned else "bold",
            no_wrap=True,
            justify="right" if numeric else "left",
            min_width=width,
        )


def comparison_caption(baseline: str) -> str:
    """What the comparison columns mean, for a table's caption."""
    return (
        f"Δ: difference to {baseline} in percentage points ± its 95% CI; p: paired t-test "
        "where both sides ran the same seeds, else Welch's (test), and (Holm-adjusted over "
        "the table); – where not resolved"
    )


#: The ``test`` column's words as the rich tables show them.
_TESTS = {"paired t": "paired", "welch": "welch"}


def _comparison_columns(table, baseline: str) -> None:
    table.add_column(terminal.text(f"Δ {baseline}"), justify="right", no_wrap=True)
    table.add_column("p (Holm)", justify="right")
    table.add_column("test", no_wrap=True)


def _comparison_cells(row: dict[str, Any], baseline: str) -> list[str]:
    """The difference, p with Holm's p and the test of a row (``baseline`` for the
    reference)."""
    if row.get("norm.name") == baseline:
        return ["baseline", "", ""]
    p, holm = row.get("p_value"), row.get("p_holm")
    return [
        _difference(row["diff_to_baseline"], row["diff_ci95"], "no_variance" in _flags(row)),
        "–" if _missing(p) else f"{_p(p)} ({_p(holm)})",
        _TESTS.get(row.get("test"), "–"),
    ]


def _flags_column(table) -> None:
    table.add_column("flags", style="yellow")


def _difference(diff: float, half: float, exact: bool = False) -> str:
    """``+1.2±0.8`` in percentage points; "–" where the seeds give no interval (fewer
    than two runs on a side): a difference alone is no result, unless it is the same on
    every seed (``exact``: no variance)."""
    if _missing(diff) or (_missing(half) and not exact):
        return "–"
    return f"{100 * diff:+.1f}" if _missing(half) else f"{100 * diff:+.1f}±{100 * half:.1f}"


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _p(value: Any) -> str:
    return "–" if _missing(value) else f"{value:.2g}"


def _flags(row: dict[str, Any]) -> list[str]:
    value = row.get("flags")
    return [] if not isinstance(value, str) or not value else value.split(";")


def _has_flags(frame: pd.DataFrame) -> bool:
    return "flags" in frame and frame["flags"].map(lambda v: isinstance(v, str) and v != "").any()


def marks(value: Any) -> str:
    """A ``flags`` cell as the rich tables show it: the short marks, comma-separated."""
    names = _flags({"flags": value})
    return ", ".join(FLAG_MARKS.get(name, name) for name in names)


def _cell(key: str, value: Any) -> str:
    """A key column's cell: a config value as typed (:func:`format_value`); the label
    :func:`normbench.reports.compare_experiments` gives an experiment (a folder's name) as it is."""
    return str(value) if key == "experiment" else format_value(value, key)


def selection_table(selection: pd.DataFrame, title: str):
    """A rich Table of :func:`normbench.analysis.stats.select`'s frame: the group keys, the
    value chosen, n, the validation accuracy that chose it and the test accuracy there
    (at each run's best validation epoch: mean ± std, 95% CI); with a baseline, the
    difference to its selected runs' (± 95% CI, p, Holm's p, test), and the flags."""
    table = _table(title)
    keys = selection_keys(selection)
    tuned = set(str(selection["tuned"].iloc[0]).split(",")) if len(selection) else set()
    _key_columns(table, selection, keys, tuned)
    table.add_column("n", justify="right")
    table.add_column("val acc %", justify="right")
    table.add_column("test acc %", justify="right")
    table.add_column("95% CI", justify="right")
    baseline = _compared_with(selection, keys)
    if baseline is not None:
        shown = format_value(baseline)
        _comparison_columns(table, shown)
        table.caption = terminal.text(
            "test acc: at each run's best validation epoch; " + comparison_caption(shown),
            "table.caption",
        )
    flagged = _has_flags(selection)
    if flagged:
        _flags_column(table)
    for row in selection.to_dict("records"):
        test = "test_acc_at_best_val"
        cells = [
            *[terminal.text(format_value(row[k], k)) for k in keys],
            str(row["n"]),
            f"{100 * row['best_val_acc_mean']:.2f}",
            _percent(row[f"{test}_mean"], row[f"{test}_std"]),
            _interval(row[f"{test}_mean"], row[f"{test}_ci95"]),
        ]
        if baseline is not None:
            cells += _comparison_cells(row, baseline)
        if flagged:
            cells.append(marks(row.get("flags")))
        table.add_row(*cells)
    return _whole_words(table)


def estimator_table(summary: pd.DataFrame, keys: Sequence[str], title: str):
    """A rich Table of BatchNorm's inference estimators per group
    (:func:`normbench.analysis.stats.estimator_differences`): the running averages'
    final test accuracy, then PreciseBN's and batch statistics' difference to it in the
    same runs (percentage points ± 95% CI, paired t-test p and Holm's p over the table);
    None when no group measured them."""
    columns = ("precise_bn_diff", "batch_stats_diff")
    if not all(c in summary for c in columns) or summary[list(columns)].isna().all().all():
        return None
    shown = summary[summary[list(columns)].notna().any(axis=1)]
    table = _table(title)
    _key_columns(table, shown, keys)
    table.add_column("n", justify="right")
    table.add_column("running avg %", justify="right")
    for label in ("PreciseBN Δ", "p (Holm)", "batch stats Δ", "p (Holm)"):
        table.add_column(label, justify="right")
    table.caption = terminal.text(
        "Δ: the estimator's test accuracy minus the running averages' in the same runs, "
        "percentage points ± 95% CI; p: paired t-test (Holm-adjusted over the table)",
        "table.caption",
    )
    for row in shown.to_dict("records"):
        cells = [terminal.text(_cell(k, row[k])) for k in keys]
        cells += [str(row["n"]), _percent(row["final_test_acc_mean"], math.nan)]
        for name in ("precise_bn", "batch_stats"):
            p = row[f"{name}_p"]
            # every run's difference the same: no test, the difference is exact
            exact = _missing(p) and row["n"] >= 2
            cells += [
                _difference(row[f"{name}_diff"], row[f"{name}_ci95"], exact),
                "–" if _missing(p) else f"{_p(p)} ({_p(row[f'{name}_p_holm'])})",
            ]
        table.add_row(*cells)
    return _whole_words(table)


def _row_label(row: dict[str, Any], keys: Sequence[str]) -> str:
    return " ".join(f"{short_key(k)}={_cell(k, row[k])}" for k in keys) or "all runs"


#: Rows a warning line names before it counts the rest.
_NAMED_ROWS = 4


def flag_lines(frame: pd.DataFrame, keys: Sequence[str], thresholds) -> list[str]:
    """One warning line per flag any row of ``frame`` (a summary or a selection) has:
    what it means and which rows (``thresholds``: the flags'
    :class:`~normbench.analysis.flags.Thresholds`)."""
    if not _has_flags(frame):
        return []
    rows = frame.to_dict("records")
    why = {
        "lr_at_edge": "the value chosen on validation is the smallest or largest of those "
        "tried: the best may lie outside the grid",
        "stale_running_stats": f"PreciseBN beats the running averages by more than "
        f"{thresholds.stale:g} points on average: the final accuracy measures stale "
        "statistics, not the variant (see test_acc_precise_bn)",
        "renorm_ramp_not_reached": "Batch Renorm runs ended before their r_max/d_max ramp "
        "did: the correction was never fully on (norm.warmup_*, norm.ramp_*)",
        "under_trained": f"mean training accuracy more than {thresholds.undertrained_gap:g} "
        "points below the table's best: the budget, not the variant, may explain the gap",
        "no_variance": "every seed scored the same on both sides (or every paired difference "
        "is the same): no test, no p-value",
        "few_seeds": "fewer than 3 seeds on a side: the 95% CIs and p-values are uninformative",
    }
    lines = []
    for name, text in why.items():
        hit = [row for row in rows if name in _flags(row)]
        if not hit:
            continue
        labels = [_row_label(row, keys) for row in hit[:_NAMED_ROWS]]
        more = len(hit) - len(labels)
        where = "; ".join(labels) + (f"; and {more} more" if more else "")
        lines.append(
            f"{name} ({FLAG_MARKS[name]}), {len(hit)} of {plural(len(rows), 'row')}: "
            f"{text} [{where}]"
        )
    return lines


# --------------------------------------------------------------- tables a paper takes

#: ``normbench results --format``: the rich table (the default), or the frame's columns
#: (those of its CSV) as Markdown, a LaTeX tabular or CSV.
TABLE_FORMATS: tuple[str, ...] = ("table", "markdown", "latex", "csv")


def _shown(frame: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """``frame`` as text cells: config values as typed (:func:`format_value`), other
    numbers in four significant digits, missing values empty."""

    def cell(column: str, value: Any) -> str:
        if column in keys:
            return _cell(column, value)
        if _missing(value) or value is pd.NA:
            return ""
        if isinstance(value, float | np.floating):
            return f"{value:.4g}"
        return str(value)

    return pd.DataFrame(
        {c: [cell(c, v) for v in frame[c]] for c in frame.columns}, index=frame.index
    )


def _numeric(frame: pd.DataFrame, column: str) -> bool:
    return pd.api.types.is_numeric_dtype(frame[column]) and not pd.api.types.is_bool_dtype(
        frame[column]
    )


def markdown_table(frame: pd.DataFrame, keys: Sequence[str]) -> str:
    """``frame`` as a Markdown (GitHub) table, every column (pandas' ``to_markdown``;
    ``|`` in a cell escaped)."""
    shown = _shown(frame, keys).map(lambda v: v.replace("|", "\\|"))
    shown.columns = [str(c).replace("|", "\\|") for c in shown.columns]
    align = ["right" if _numeric(frame, c) else "left" for c in frame.columns]
    return shown.to_markdown(
        index=False, tablefmt="github", disable_numparse=True, colalign=align or None
    )


def latex_table(frame: pd.DataFrame, keys: Sequence[str]) -> str:
    """``frame`` as a LaTeX tabular (booktabs rules), every column (pandas'
    ``Styler.to_latex``; cells and headers escaped for LaTeX)."""
    shown = _shown(frame, keys)
    align = "".join("r" if _numeric(frame, c) else "l" for c in frame.columns) or "l"
    styler = shown.style.hide(axis="index").format(escape="latex")
    styler = styler.format_index(escape="latex", axis=1)
    return styler.to_latex(hrules=True, column_format=align)


def csv_table(frame: pd.DataFrame) -> str:
    """``frame`` as its CSV (what summary.csv and selected.csv hold)."""
    return frame.to_csv(index=False)


def _comment(line: str) -> str:
    """A LaTeX comment line (a note under a tabular: it compiles to nothing)."""
    return "% " + line.replace("\n", " ")


def paper_text(
    frame: pd.DataFrame, keys: Sequence[str], title: str, notes: Sequence[str], fmt: str
) -> str:
    """One table in a text ``fmt`` (:data:`TABLE_FORMATS` but "table") with its title and its
    notes (the warning lines and the caption): Markdown, a title line, the table and a
    list; LaTeX, the tabular between comment lines; CSV, the table alone (the notes go
    to the terminal's warnings, by the caller)."""
    if fmt == "csv":
        return csv_table(frame)
    if fmt == "markdown":
        text = f"**{title}**\n\n{markdown_table(frame, keys)}\n"
        return text + "".join(f"\n- {note}" for note in notes) + ("\n" if notes else "")
    lines = [_comment(title), latex_table(frame, keys).rstrip("\n"), *map(_comment, notes)]
    return "\n".join(lines) + "\n"


def defaults_text(collected: Collected) -> str | None:
    """The keys filled with defaults, for a table's caption (None: none)."""
    if not collected.defaulted:
        return None
    parts = [
        f"{key} = {', '.join(format_value(v, key) for v in values)} for {plural(count, 'run')}"
        for key, (values, count) in collected.defaulted.items()
    ]
    return "defaults filled in where older runs lack a key: " + "; ".join(parts)


def describe(exp_dir: Path, collected: Collected) -> str:
    """One line: how many runs the experiment has, by status, and how many were skipped."""
    counts = collected.counts()
    parts = [f"{counts[s]} {s}" for s in STATUSES if counts[s] or s != "interrupted"]
    if counts["other"]:
        parts.append(f"{counts['other']} other")
    line = f"{exp_dir}: {plural(len(collected.runs), 'run')} ({', '.join(parts)})"
    if counts["incomplete"]:
        line += f"; {counts['incomplete']} incomplete (no summary.json yet) skipped"
    if counts["unreadable"]:
        shown = ", ".join(str(p) for p in collected.unreadable[:3])
        more = "..." if counts["unreadable"] > 3 else ""
        line += f"; {counts['unreadable']} unreadable skipped ({shown}{more})"
    if collected.copies:
        copies = len(collected.copies)
        line += f"; {copies} {'copy' if copies == 1 else 'copies'} of other runs counted once"
    return line


def warnings(collected: Collected) -> list[str]:
    """One line per run folder skipped, naming it and why."""
    lines = [f"skipped {path}: {why}" for path, why in collected.problems.items()]
    lines += [
        f"{plural(count, 'run')} of {len(collected.runs)} lack {key} (written by an older "
        f"normbench): grouped with its default, {', '.join(format_value(v, key) for v in values)}"
        for key, (values, count) in collected.defaulted.items()
    ]
    return lines + [
        f"skipped {path}: a copy of a run read from another folder" for path in collected.copies
    ]


def nothing_readable(exp_dir: Path, collected: Collected) -> str | None:
    """One line when an experiment has run folders but none can be read because they are
    damaged (not merely unfinished): the first one and why; None otherwise."""
    if not collected.runs.empty or not collected.unreadable:
        return None
    first, why = next(iter(collected.problems.items()))
    more = len(collected.unreadable) - 1
    line = f"{exp_dir}: none of its runs can be read ({first}: {why}"
    line += f"; and {more} more)" if more else ")"
    if collected.incomplete:
        line += f", {len(collected.incomplete)} not finished"
    return line


# ------------------------------------------------------------------------------- bench


def _bench_figure(value: float) -> str:
    """Four or five significant digits for times and rates from 0.001 to 9999."""
    return f"{value:.3f}" if value < 10 else f"{value:.2f}" if value < 100 else f"{value:.1f}"


def _bytes_text(nbytes: float) -> str:
    """Bytes in the largest binary unit they reach: 8 MiB, 1.5 KiB, 1000 bytes."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.4g} {unit}"
    return f"{int(nbytes)} bytes"


def bench_table(frame: pd.DataFrame, copy_impl: str):
    """:func:`normbench.bench.run_bench`'s frame for the terminal: a section per shape,
    the rows of ``copy_impl`` (the plain copy each shape is measured against) dimmed.

    Narrow enough for 80 columns; the CSV holds every figure unrounded.
    """
    from rich import box
    from rich.table import Table

    first = frame.iloc[0]
    title = (
        f"BatchNorm2d training forward+backward, {first['dtype']}, "
        f"{first['memory_format']}, {first['device']} "
        f"({first['device_name']}), {first['threads']} threads, torch {first['torch_version']}: "
        f"milliseconds, median and interquartile range of {first['repeats']} interleaved repeats"
    )
    malloc = "kept (normbench.allocator)" if first["malloc"] == "kept" else "glibc's defaults"
    mib = first["machine_copy_bytes"] / (1 << 20)
    stream = first["stream_bytes"]
    streaming = "" if pd.isna(stream) else f"; cpu streams outputs from {_bytes_text(stream)} on"
    caption = (
        "GB/s as a fraction of the copy of the same size (%copy) and of the machine's copy "
        f"bandwidth (%mem: {_bench_figure(first['machine_copy_gbps'])} GB/s, 2 x {mib:.0f} MiB "
        f"arrays); PF: page faults per step, mean; malloc: {malloc}{streaming}"
    )
    result = Table(
        title=title,
        caption=caption,
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
    )
    result.add_column("shape", style="bold", no_wrap=True)
    result.add_column("impl", style="cyan", no_wrap=True)
    result.add_column("median", justify="right", no_wrap=True)
    result.add_column("IQR", justify="right", no_wrap=True)
    result.add_column("GB/s", justify="right", no_wrap=True)
    result.add_column("vs torch", justify="right", no_wrap=True)
    result.add_column("%copy", justify="right", no_wrap=True)
    result.add_column("%mem", justify="right", no_wrap=True)
    result.add_column("PF", justify="right", no_wrap=True)
    for i, (label, rows) in enumerate(frame.groupby("shape", sort=False)):
        if i:
            result.add_section()
        for j, row in enumerate(rows.itertuples()):
            speedup = row.speedup_vs_torch
            result.add_row(
                label if j == 0 else "",
                row.impl,
                _bench_figure(row.median_ms),
                f"{_bench_figure(row.q1_ms)}-{_bench_figure(row.q3_ms)}",
                _bench_figure(row.gbps),
                "" if math.isnan(speedup) else f"{speedup:.2f}x",
                f"{100 * row.frac_of_copy_bw:.0f}%",
                f"{100 * row.frac_of_machine_bw:.0f}%",
                f"{row.page_faults:.0f}",
                style="dim" if row.impl == copy_impl else None,
            )
    return result

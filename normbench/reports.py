"""An experiment's tables and figures: aggregating its runs into runs.csv,
runs.parquet, metrics.csv, summary.csv (and selected.csv), drawing its figures into
``plots/``, and gathering tables, warnings and figures into ``report.md``. Files are
written through :mod:`normbench.rundir`; what is shown is returned (rich tables, or the
text of Markdown, LaTeX and CSV tables, from :mod:`normbench.views.tables`), never
printed here.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd

from normbench import __version__, received, terminal
from normbench.analysis.collect import Collected, collect, find_experiments
from normbench.analysis.flags import Thresholds
from normbench.analysis.keys import check_x_axis, keys_along, resolve_key, swept_keys, x_column
from normbench.analysis.stats import (
    baseline_of,
    group_stats,
    selected_runs,
    selection_keys,
    tuned_keys,
)
from normbench.analysis.stats import select as select_values
from normbench.errors import UserError
from normbench.rundir import (
    BN_STATS_FILE,
    bn_stats_frame,
    check_real_folder,
    check_writable,
    read_bn_stats,
    write_bytes,
    write_csv,
    write_figure,
    write_parquet,
    write_text,
)
from normbench.views.bn_figures import bn_stats_figures
from normbench.views.error_figures import error_vs_batch_size
from normbench.views.figures import FIGURE_FORMATS, save_settings, training_curves
from normbench.views.inference_figures import bn_inference
from normbench.views.tables import (
    TABLE_FORMATS,
    budget_text,
    defaults_text,
    describe,
    estimator_table,
    flag_lines,
    nothing_readable,
    paper_text,
    selection_table,
    summary_table,
    warnings,
)
from normbench.views.text import short_key


#: The tables :func:`aggregate` writes into an experiment folder.
class NothingToPlot(UserError):
    """An experiment without a completed run: nothing is drawn or written."""


TABLE_FILES: tuple[str, ...] = ("runs.csv", "runs.parquet", "metrics.csv", "summary.csv")


# ------------------------------------------------------------------------------ writing


def aggregate(exp_dir: Path) -> tuple[Collected, pd.DataFrame]:
    """Collect an experiment (:func:`collect`), summarise it over seeds (:func:`group_stats`
    with no ``group_by``) and write its four tables (``TABLE_FILES``) beside ``runs/``,
    each atomically. Returns ``(collected, summary)``.

    - ``runs.csv``, ``runs.parquet``: ``collected.runs``, one row per run;
    - ``metrics.csv``: ``collected.metrics``, every run's metrics, long (``METRIC_COLUMNS``);
    - ``summary.csv``: the summary, one row per group of runs that differ only in seed.
    """
    collected = collect(exp_dir)
    return collected, _write_tables(Path(exp_dir), collected)


def _write_tables(
    exp_dir: Path,
    collected: Collected,
    baseline: str | None = None,
    thresholds: Thresholds | None = None,
) -> pd.DataFrame:
    summary = group_stats(collected.runs, baseline=baseline, thresholds=thresholds)
    write_parquet(exp_dir / "runs.parquet", collected.runs)
    write_csv(exp_dir / "runs.csv", collected.runs)
    if collected.metrics_csv:
        write_bytes(exp_dir / "metrics.csv", collected.metrics_csv)
    else:
        write_csv(exp_dir / "metrics.csv", collected.metrics)
    write_csv(exp_dir / "summary.csv", summary)
    bn_stats = bn_stats_table(exp_dir, collected.runs)
    if not bn_stats.empty:  # (no run measured any: no file)
        write_csv(exp_dir / BN_STATS_FILE, bn_stats)
    return summary


def thresholds_of(stale_threshold: float | None, undertrained_gap: float | None) -> Thresholds:
    """The flags' thresholds ``normbench results`` was given (None: the config's default),
    checked by the config's rules (``report.stale_threshold``, ``report.undertrained_gap``):
    a :class:`UserError` naming the option otherwise."""
    from normbench.validation import check_value

    given = {"stale_threshold": stale_threshold, "undertrained_gap": undertrained_gap}
    for name, value in given.items():
        problem = None if value is None else check_value(f"report.{name}", value)
        if problem:
            raise UserError(f"--{name.replace('_', '-')}: {problem}")
    return Thresholds.of(SimpleNamespace(**given))


def bn_stats_table(exp_dir: Path, runs: pd.DataFrame) -> pd.DataFrame:
    """Every run's per-layer BatchNorm diagnostics (``runs/<run_id>/bn_stats.csv``), in
    the runs' order; a run without the file adds nothing, a damaged one is skipped."""
    folder = Path(exp_dir) / "runs"
    try:
        names = set(os.listdir(folder))
    except OSError:
        names = set()
    frames = []
    for rid in runs.get("run_id", ()):
        if rid not in names:  # (a run id is never joined into a path unchecked)
            continue
        with contextlib.suppress(OSError, ValueError):
            frame = read_bn_stats(folder / rid / BN_STATS_FILE)
            frames.append(frame[frame["run_id"] == rid])
    return pd.concat(frames, ignore_index=True) if frames else bn_stats_frame("", [])


def report(
    paths: Sequence[Path] | None = None,
    group_by: Sequence[str] | None = None,
    warn: Callable[[str], None] | None = None,
    select: Sequence[str] | None = None,
    baseline: str | None = None,
    compare: bool = False,
    fmt: str = "table",
    thresholds: Thresholds | None = None,
    note: Callable[[Any], None] | None = None,
    draw: bool = False,
    shown: dict[str, Any] | None = None,
    x: str = "batch_size",
) -> Iterator[Any]:
    """``normbench results``: aggregate every experiment under ``paths``
    (:func:`find_experiments`) and yield what to print: per experiment, its run counts,
    where the tables went, and the summary table grouped by ``group_by`` (default: the
    swept keys), with differences to ``baseline``, BatchNorm's inference estimators
    compared and a warning line per flag. ``select``: keys tuned on validation
    (:func:`normbench.analysis.stats.select`), written to ``selected.csv`` and shown as a
    table. ``compare``: one table of every experiment instead of one each, with an
    ``experiment`` column first (:func:`compare_experiments`). ``fmt``: ``table`` (rich
    tables) or ``markdown``, ``latex``, ``csv`` (:data:`~normbench.views.tables.TABLE_FORMATS`:
    the tables as text, the counts and the lines of files written to ``note``).
    ``thresholds``: the flags' (None: the config's defaults). ``draw``: each experiment's
    figures too (:func:`plot_experiment`, as a sweep's end). Each experiment gets a
    ``report.md`` (:func:`write_report`). Every folder and key is checked before any
    table is written. ``shown``: filled with what the tables were shown with (the counts
    line, keys, caption), for :func:`sweep_reports` to show them again unchanged. ``x``:
    the error figure's x axis; with ``norm_batch_size``, the summary table is grouped by
    it in place of the keys that move it (:func:`~normbench.analysis.keys.keys_along`).
    """
    if fmt not in TABLE_FORMATS:
        raise UserError(f"--format must be one of {', '.join(TABLE_FORMATS)}, got {fmt!r}")
    thresholds = thresholds or Thresholds.of()
    experiments = find_experiments(paths, warn)
    if compare and len(experiments) < 2:
        found = ", ".join(map(str, experiments))
        raise UserError(f"--compare needs two experiments or more; found one: {found}")
    plans = []
    unusable: list[str] = []  # experiments whose every run is damaged: no tables
    for exp_dir in experiments:
        check_writable(exp_dir)  # a read-only folder says so before any work
        collected = collect(exp_dir)
        problem = nothing_readable(exp_dir, collected)
        if problem:
            unusable.append(problem)
            continue
        runs = collected.runs
        if runs.empty:
            keys, reference, selection = [], None, None
        else:
            if group_by:
                keys = _grouped_by(runs, group_by)
            else:
                try:
                    keys = keys_along(runs, x)
                except UserError as error:
                    raise UserError(f"{exp_dir}: {error}") from None
            reference = baseline_of(runs, baseline)
            selection = select_values(runs, select, reference, thresholds) if select else None
        plans.append((exp_dir, collected, keys, reference, selection))
    if unusable and not plans:  # a bad folder handed over: say so, write nothing
        if len(unusable) == 1:
            raise UserError(f"{unusable[0]}: no tables written")
        raise UserError(f"no run of the {len(unusable)} experiments can be read: {unusable[0]}")
    if warn is not None:
        for line in unusable:
            warn(f"{line}: no tables for it")
    side_by_side = (
        compare_experiments(
            {exp: c.runs for exp, c, *_ in plans}, group_by, baseline, fmt, thresholds, warn
        )
        if compare
        else None
    )
    told = note if fmt != "table" and note is not None else None
    for exp_dir, collected, keys, reference, selection in plans:
        _write_tables(exp_dir, collected, reference, thresholds)
        written = list(TABLE_FILES)
        if selection is not None:
            write_csv(exp_dir / "selected.csv", selection)
            written.append("selected.csv")
        if warn is not None:
            for line in warnings(collected):
                warn(line)
        written.append("report.md")
        counts = [describe(exp_dir, collected), f"wrote {', '.join(written)} to {exp_dir}"]
        if shown is not None:
            shown.update(counts=counts[0], keys=list(keys), selection=selection is not None)
            shown["runs"] = len(collected.runs)
        if told is not None:
            for line in counts:
                told(line)
        else:
            yield from counts
        sections: list[str] = []
        if not collected.runs.empty:
            summary = group_stats(collected.runs, keys, reference, thresholds)
            notes = (budget_text(collected.runs), defaults_text(collected))
            caption = "; ".join(filter(None, notes)) or None
            if shown is not None:
                shown["caption"] = caption
            title, lines, show = _summary_section(
                exp_dir, summary, keys, caption, thresholds, fmt, warn
            )
            sections.append(_markdown(summary, keys, title, [*filter(None, [caption]), *lines]))
            if side_by_side is None:
                yield from show()
        if selection is not None:
            title, chosen, lines, printed = _selection_section(
                exp_dir, selection, thresholds, fmt, warn
            )
            sections.append(_markdown(selection, chosen, title, lines))
            yield from printed
        if draw:
            try:
                for path in plot_experiment(exp_dir, x=x):
                    if shown is not None:
                        shown.setdefault("figures", []).append(path)
                    yield f"wrote {path}"
            except NothingToPlot as error:
                if note is not None:
                    note(terminal.styled(("no plots", "yellow"), f": {error}"))
        write_report(exp_dir, counts[0], sections)
    if side_by_side is not None:
        yield from side_by_side


def _grouped_by(runs: pd.DataFrame, group_by: Sequence[str]) -> list[str]:
    """The columns ``--group-by`` names, repeated or comma-separated (``norm,norm_batch_size``)."""
    named = [k.strip() for keys in group_by for k in keys.split(",") if k.strip()]
    return list(dict.fromkeys(resolve_key(runs, k) for k in named))


def _summary_section(
    exp_dir: Path,
    summary: pd.DataFrame,
    keys: Sequence[str],
    caption: str | None,
    thresholds: Thresholds,
    fmt: str,
    warn: Callable[[str], None] | None,
) -> tuple[str, list[str], Callable[[], list[Any]]]:
    """The summary table's title, its flag lines and a function giving what to print of
    it in ``fmt`` (the BatchNorm-at-inference table after it; called only where it is
    shown: not under ``--compare``): as :func:`report` shows it, and :func:`sweep_reports`
    again from ``summary.csv``."""
    by = ", ".join(map(short_key, keys)) or "all runs"
    title = f"{exp_dir}: test accuracy over seeds, by {by}"
    lines = flag_lines(summary, keys, thresholds)

    def show() -> list[Any]:
        table = summary_table(summary, keys, title, caption)
        estimators = estimator_table(summary, keys, f"{exp_dir}: BatchNorm at inference, by {by}")
        return _shown(summary, keys, title, caption, lines, fmt, table, warn, estimators)

    return title, lines, show


def _selection_section(
    exp_dir: Path,
    selection: pd.DataFrame,
    thresholds: Thresholds,
    fmt: str,
    warn: Callable[[str], None] | None,
) -> tuple[str, list[str], list[str], list[Any]]:
    """The selected table's title, keys, flag lines and what to print of it in ``fmt``
    (as :func:`_summary_section`)."""
    title = f"{exp_dir}: chosen on validation"
    chosen = selection_keys(selection)
    lines = flag_lines(selection, chosen, thresholds)
    table = selection_table(selection, title)
    return title, chosen, lines, _shown(selection, chosen, title, None, lines, fmt, table, warn)


def _shown(
    frame: pd.DataFrame,
    keys: Sequence[str],
    title: str,
    caption: str | None,
    lines: Sequence[str],
    fmt: str,
    table: Any,
    warn: Callable[[str], None] | None,
    extra: Any = None,
) -> list[Any]:
    """What to print of one table: the rich ``table`` (and ``extra``, the estimators'
    table) with a warning line per flag under it; or ``frame`` as text in ``fmt``, its
    flag lines under it (for CSV, to ``warn``: a CSV holds nothing but the table)."""
    if fmt == "table":
        flagged = [terminal.styled(("warning:", "yellow"), f" {line}") for line in lines]
        return [table, *flagged, *([extra] if extra is not None else [])]
    if fmt == "csv" and warn is not None:
        for line in lines:
            warn(line)
    notes = [*filter(None, [caption]), *lines]
    return [terminal.text(paper_text(frame, keys, title, notes, fmt), newlines=True)]


def _markdown(frame: pd.DataFrame, keys: Sequence[str], title: str, notes: Sequence[str]) -> str:
    return paper_text(frame, keys, title, notes, "markdown")


def write_report(exp_dir: Path, counts: str, sections: Sequence[str]) -> Path:
    """``<exp_dir>/report.md``: the experiment's name, its run counts, its tables in
    Markdown with their notes and warning lines (``sections``), and its figures
    (``plots/*.png`` as they are now) as images; written through :mod:`normbench.rundir`."""
    exp_dir = Path(exp_dir)
    parts = [f"# {exp_dir.name}", counts, *sections]
    plots = exp_dir / "plots"
    figures = sorted(p.name for p in plots.glob("*.png") if p.is_file()) if plots.is_dir() else []
    if figures:
        parts.append("## Figures")
        parts += [f"![{name}](plots/{name})" for name in figures]
    path = exp_dir / "report.md"
    write_text(path, "\n\n".join(part.rstrip("\n") for part in parts) + "\n")
    return path


def sweep_reports(
    folders: Sequence[Path],
    settings,
    warn: Callable[[str], None],
    note: Callable[[Any], None],
    logger=None,
) -> Iterator[Any]:
    """A sweep's end: every experiment folder aggregated and plotted, with the selection,
    baseline and flag thresholds its config's ``report`` settings ask for (None: none, and
    the defaults). Yields what to print (:func:`report`'s lines and tables, the figures
    written); an experiment with no runs or nothing to plot is told to ``note``, a
    selection the finished runs cannot make to ``warn`` (the tables come without it).
    ``logger``: the sweep's ``logger`` settings; the figures drawn go to its trackers
    (:func:`normbench.trackers.log_figures`).

    An experiment none of whose runs changed since its tables were last written here (and
    whose tables, figures and report settings are as they were then: :data:`STAMP_FILE`)
    keeps them: one line says so, and its tables are shown again from ``summary.csv``
    (and ``selected.csv``), without collecting the runs or drawing a figure."""
    select = list(settings.select) if settings is not None and settings.select else None
    baseline = settings.baseline if settings is not None else None
    thresholds = Thresholds.of(settings)
    x = getattr(settings, "x", None) or "batch_size"
    wanted = {"select": select, "baseline": baseline, "thresholds": vars(thresholds), "x": x}
    for folder in folders:
        if not (folder / "runs").is_dir():  # every job was lost before its run began
            note(f"{folder}: no runs yet, no tables")
            continue
        runs = runs_fingerprint(folder)  # before collecting: a run ending meanwhile redraws
        kept = _kept(folder, runs, wanted, thresholds)
        if kept is not None:
            yield from kept
            continue
        warned: list[str] = []
        noted: list[Any] = []
        warn_and_keep, note_and_keep = _told(warn, warned), _told(note, noted)
        common = {"warn": warn_and_keep, "note": note_and_keep}
        common |= {"baseline": baseline, "thresholds": thresholds}
        shown: dict[str, Any] = {}
        try:
            printed = list(report([folder], select=select, draw=True, shown=shown, x=x, **common))
        except UserError as error:  # a selection the runs cannot make, runs without x
            warn_and_keep(f"{error}; tables and figures without it")
            printed = list(report([folder], draw=True, shown=shown, **common))
        yield from printed
        if shown.get("figures"):
            from normbench.trackers import log_figures

            log_figures(logger, folder, shown["figures"], shown.get("runs", 0))
        # The stamp keeps what the tables were shown with (the figures drawn and the run
        # count went to the trackers above), the settings, and what they were made from.
        stamped = {key: shown[key] for key in STAMPED if key in shown}
        prefix = f"{folder}: "
        # Warned of (a damaged run), nothing drawn, no table: made again each time.
        if not noted and not warned and str(stamped.get("counts", "")).startswith(prefix):
            stamped["counts"] = stamped["counts"].removeprefix(prefix)  # the folder may move
            stamp = {"version": __version__, **stamped, "settings": wanted}
            stamp |= {"runs": runs, "outputs": outputs_fingerprint(folder)}
            write_text(folder / STAMP_FILE, json.dumps(stamp) + "\n")


def _told(tell: Callable[[Any], None], into: list[Any]) -> Callable[[Any], None]:
    """``tell``, keeping what it was told in ``into`` too."""

    def told(line: Any) -> None:
        into.append(line)
        tell(line)

    return told


#: Beside an experiment's tables: what :func:`sweep_reports` made them from (each run's
#: summary.json, the report settings, normbench's version) and the files it wrote, so that
#: a sweep's end where nothing changed keeps them.
STAMP_FILE = ".tables.json"
#: What :func:`report` showed the tables with, as the stamp keeps it (read back by
#: :func:`_kept`).
STAMPED = ("counts", "keys", "selection", "caption")

#: Files of an experiment folder its tables are (``plots/*`` too).
_OUTPUTS = (*TABLE_FILES, "selected.csv", BN_STATS_FILE, "report.md")


def _stat(path: Path) -> list[int] | None:
    try:
        info = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return [info.st_size, info.st_mtime_ns]


def runs_fingerprint(exp_dir: Path) -> dict[str, list[int] | None]:
    """Every run folder's name with its summary.json's size and modification time (None:
    none yet): which changes when a run ends, is redone, or is added or removed."""
    runs = Path(exp_dir) / "runs"
    try:
        names = sorted(os.listdir(runs))
    except OSError:
        return {}
    return {name: _stat(runs / name / "summary.json") for name in names}


def outputs_fingerprint(exp_dir: Path) -> dict[str, list[int] | None]:
    """The experiment's tables, report and figures (``plots/*``), as :func:`_stat` sees them."""
    exp_dir = Path(exp_dir)
    try:
        plots = [f"plots/{name}" for name in sorted(os.listdir(exp_dir / "plots"))]
    except OSError:
        plots = []
    return {name: _stat(exp_dir / name) for name in [*_OUTPUTS, *plots]}


def _kept(
    exp_dir: Path,
    runs: dict[str, list[int] | None],
    wanted: dict[str, Any],
    thresholds: Thresholds,
) -> list[Any] | None:
    """What to print for an experiment whose tables are kept (its stamp matches its runs,
    settings and files); None when they are to be made again."""
    path = exp_dir / STAMP_FILE
    try:
        stamp = json.loads(received.read_bytes(path, received.TABLE_MAX))
        if (
            stamp.get("version") != __version__
            or stamp.get("settings") != wanted
            or stamp.get("runs") != runs
            or stamp.get("outputs") != outputs_fingerprint(exp_dir)
        ):
            return None
        keys, caption = list(stamp["keys"]), stamp.get("caption")
        counts = f"{exp_dir}: {stamp['counts']}"
        summary = _read_table(exp_dir / "summary.csv")
        selection = _read_table(exp_dir / "selected.csv") if stamp["selection"] else None
        if not set(keys) <= set(summary.columns):  # shown by keys summary.csv lacks
            return None  # (grouped by the norm batch, report.x): made again
    except (OSError, ValueError, KeyError, TypeError, pd.errors.ParserError):
        return None  # none, another version's, damaged: made again
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.stat(path).st_mtime))
    printed: list[Any] = [
        counts,
        f"{exp_dir}: no run changed since the tables of {when}: tables and figures kept",
    ]
    if keys and not summary.empty:
        printed += _summary_section(exp_dir, summary, keys, caption, thresholds, "table", None)[2]()
    if selection is not None:
        printed += _selection_section(exp_dir, selection, thresholds, "table", None)[3]
    return printed


def _read_table(path: Path) -> pd.DataFrame:
    """A table :func:`report` wrote, read back as it was shown (no flags: ``""``)."""
    frame = pd.read_csv(io.BytesIO(received.read_bytes(path, received.TABLE_MAX)))
    if "flags" in frame:
        frame["flags"] = frame["flags"].fillna("").astype(str)
    return frame


def experiment_labels(experiments: Sequence[Path]) -> dict[Path, str]:
    """Short names for experiment folders: their own names, or, where two share a name,
    their paths from the folder the experiments have in common."""
    names = [Path(exp).name for exp in experiments]
    if len(set(names)) == len(names):
        return dict(zip(experiments, names, strict=True))
    resolved = [Path(exp).resolve() for exp in experiments]
    common = Path(os.path.commonpath(resolved))
    return {
        exp: str(path.relative_to(common)) or path.name
        for exp, path in zip(experiments, resolved, strict=True)
    }


def compare_experiments(
    runs_by_experiment: dict[Path, pd.DataFrame],
    group_by: Sequence[str] | None = None,
    baseline: str | None = None,
    fmt: str = "table",
    thresholds: Thresholds | None = None,
    warn: Callable[[str], None] | None = None,
) -> list[Any]:
    """One summary table of several experiments side by side (``normbench results A B
    --compare``): their runs together with an ``experiment`` column, grouped by it and by
    ``group_by`` (default: every key that differs between the runs of all of them), so
    a row is one experiment's group; differences to ``baseline`` stay within each
    experiment. What to print: the table in ``fmt`` and its flags' warning lines."""
    labels = experiment_labels(list(runs_by_experiment))
    frames = [
        runs.assign(experiment=labels[exp])
        for exp, runs in runs_by_experiment.items()
        if not runs.empty
    ]
    if not frames:
        return [f"{', '.join(labels.values())}: no runs to compare"]
    runs = pd.concat(frames, ignore_index=True)
    keys = _grouped_by(runs, group_by) if group_by else swept_keys(runs)
    keys = ["experiment", *(k for k in keys if k != "experiment")]
    thresholds = thresholds or Thresholds.of()
    summary = group_stats(runs, keys, baseline_of(runs, baseline), thresholds)
    by = ", ".join(map(short_key, keys))
    title = f"{' vs '.join(labels.values())}: test accuracy over seeds, by {by}"
    caption = budget_text(runs)
    table = summary_table(summary, keys, title, caption)
    lines = flag_lines(summary, keys, thresholds)
    return _shown(summary, keys, title, caption, lines, fmt, table, warn)


# ----------------------------------------------------------------------------- writing


def plot_experiment(
    exp_dir: Path,
    warn: Callable[[str], None] | None = None,
    *,
    fmt: str = "png",
    log_error: bool = False,
    x: str = "batch_size",
) -> list[Path]:
    """Collect an experiment's runs, draw every figure and write them into
    ``<exp_dir>/plots/`` as ``fmt`` (png, pdf or svg:
    :data:`~normbench.views.figures.FIGURE_FORMATS`);
    returns the paths written, error figures first. ``log_error``: logarithmic error axes.
    ``x``: the error figure's x axis (:data:`~normbench.schema.config.X_AXES`).
    With a ``selected.csv``, the error and BatchNorm-inference figures draw the runs it
    chose.

    Raises :class:`NothingToPlot` (a UserError; nothing written) when no run of the
    experiment completed, or its runs lack ``x`` (recorded before normbench wrote it).
    """
    import matplotlib

    _check_format(fmt)
    exp_dir = Path(exp_dir)
    check_real_folder(exp_dir / "plots")  # a link a received folder brought: never followed
    check_writable(exp_dir / "plots")  # a read-only folder, a file named plots: say so first
    collected = collect(exp_dir)
    damaged = nothing_readable(exp_dir, collected)
    if damaged:
        raise NothingToPlot(damaged)
    if warn is not None:
        for line in warnings(collected):
            warn(line)
    runs = collected.runs
    selected, tuned = _selection(exp_dir, runs, warn)
    completed = 0 if runs.empty else int((runs["status"] == "completed").sum())
    if not completed:
        counts = {} if runs.empty else runs["status"].value_counts().to_dict()
        found = [f"{n} {status}" for status, n in sorted(counts.items())]
        if collected.incomplete:
            found.append(f"{len(collected.incomplete)} unfinished")
        raise NothingToPlot(
            f"{exp_dir}: no completed runs to plot ({', '.join(found) or 'no runs'})"
        )
    try:
        x_column(selected, x)
    except UserError as error:
        raise NothingToPlot(f"{exp_dir}: {error}") from None
    written = []
    rc, options = save_settings(fmt)
    with _missing_glyphs(exp_dir / "plots", warn), matplotlib.rc_context(rc):
        figures = (
            error_vs_batch_size(selected, tuned, log=log_error, x=x)
            + training_curves(runs, collected.metrics)
            + bn_inference(selected, tuned, log=log_error)
            + bn_stats_figures(runs, bn_stats_table(exp_dir, runs))
        )
        for name, figure in figures:
            path = (exp_dir / "plots" / name).with_suffix(f".{fmt}")
            write_figure(path, figure, **options)
            written.append(path)
    return written


def _check_format(fmt: str) -> None:
    if fmt not in FIGURE_FORMATS:
        raise UserError(f"--format must be one of {', '.join(FIGURE_FORMATS)}, got {fmt!r}")


# matplotlib's warning for a character its fonts lack, as matplotlib 3.x words it
_GLYPH = re.compile(r"Glyph (\d+) .*missing from font\(s\) (.+?)\.?$")


@contextlib.contextmanager
def _missing_glyphs(folder: Path, warn: Callable[[str], None] | None) -> Iterator[None]:
    """matplotlib's warnings of characters its fonts lack (a run's name in a script the
    font does not cover: one warning per character and figure, in Python's two lines)
    as one line at the end, to ``warn`` (else a :class:`~normbench.errors.Notice`):
    which characters, drawn as boxes. Other warnings pass on as they came."""
    import warnings

    from normbench.errors import Notice

    missing: dict[str, None] = {}  # in the order met, once each
    fonts: dict[str, None] = {}
    registry: dict = {}  # another warning repeated (once per figure) is shown once
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for warning in caught:
            found = _GLYPH.match(str(warning.message))
            if found:
                missing[chr(int(found[1]))] = None
                fonts[found[2]] = None
            else:
                warnings.warn_explicit(
                    warning.message,
                    warning.category,
                    warning.filename,
                    warning.lineno,
                    registry=registry,
                )
        if missing:
            chars = [f"{char} (U+{ord(char):04X})" for char in missing]
            shown = ", ".join(chars[:8]) + (f" and {len(chars) - 8} more" if len(chars) > 8 else "")
            message = (
                f"{folder}: the figures' font ({', '.join(fonts)}) has no glyph for {shown}: "
                "drawn as boxes"
            )
            if warn is not None:
                warn(message)
            else:
                warnings.warn(message, Notice, stacklevel=3)


def _selection(exp_dir: Path, runs: pd.DataFrame, warn) -> tuple[pd.DataFrame, list[str]]:
    """The runs the error figure draws: those ``selected.csv`` chose (``normbench results
    --select``), with the keys tuned; else every run."""

    path = Path(exp_dir) / "selected.csv"
    if not path.is_file():
        return runs, []
    try:  # a regular file of a sane size only: a received folder's may be anything
        selection = pd.read_csv(io.BytesIO(received.read_bytes(path, received.TABLE_MAX)))
        keys = selection_keys(selection)
        tuned = tuned_keys(selection)
    except (OSError, ValueError, KeyError, pd.errors.ParserError):
        selection, keys, tuned = None, [], []
    if selection is None or not set(keys) <= set(runs.columns) or not tuned:
        if warn is not None:
            warn(f"{path} does not match these runs: drawing every run")
        return runs, []
    # read back from CSV, the key columns' types follow the runs' own
    for key in keys:
        selection[key] = selection[key].astype(runs[key].dtype, errors="ignore")
    return selected_runs(runs, selection), tuned


def plot_experiments(
    paths: Sequence[Path] | None,
    warn: Callable[[str], None] | None = None,
    *,
    fmt: str = "png",
    log_error: bool = False,
    x: str = "batch_size",
) -> list[Path]:
    """:func:`plot_experiment` (as ``fmt``, with ``log_error`` and ``x``) for every experiment under
    ``paths`` (the rules of :func:`normbench.analysis.collect.find_experiments`). An
    experiment with nothing to plot is reported to ``warn`` (when there are several) and
    skipped; when none has anything, :class:`NothingToPlot` is raised and nothing is
    written."""
    _check_format(fmt)
    check_x_axis(x)
    experiments = find_experiments(paths, warn)
    for exp_dir in experiments:  # every one before the first figure is written
        check_real_folder(exp_dir / "plots")
    written: list[Path] = []
    problems: list[str] = []
    for exp_dir in experiments:
        try:
            written += plot_experiment(exp_dir, warn, fmt=fmt, log_error=log_error, x=x)
        except NothingToPlot as error:
            problems.append(str(error))
            if warn is not None and len(experiments) > 1:
                warn(str(error))
    if not written:
        if len(problems) == 1:
            raise NothingToPlot(problems[0])
        raise NothingToPlot(f"nothing to plot in {len(experiments)} experiments: no completed runs")
    return written

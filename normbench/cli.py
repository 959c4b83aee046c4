"""normbench's command line: Typer commands that parse, call one function and print.

torch, Hydra and pandas are imported inside the commands, so ``normbench --help``
answers at once. A :class:`~normbench.errors.UserError` becomes one message on
stderr and exit status 2.
"""

from __future__ import annotations

import functools
import gc
import re
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer

from normbench import terminal
from normbench.bench import DEFAULT_OUT, DEFAULT_REPEATS, DEFAULT_SHAPES, DEFAULT_WARMUP
from normbench.errors import Notice, UserError

# typer parses with its own copy of click (typer 0.2x; click itself before, which is not
# otherwise installed now): the errors it prints for a bad command line are that copy's.
_ParseError = (getattr(typer.core, "_click", None) or typer.core.click).ClickException


class _Group(typer.core.TyperGroup):
    """normbench's commands, whose parsing errors (click's: an unknown option or command,
    a bad value) show what was typed cleaned (:func:`terminal.clean`): click quotes it as
    it came, and typer escapes ASCII control characters only."""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except _ParseError as error:
            raise _cleaned(error) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _ParseError as error:
            raise _cleaned(error) from None


def _cleaned(error: Exception) -> Exception:
    """``error`` with its message (however its class composes it) cleaned."""
    message = terminal.clean(error.format_message())
    error.format_message = lambda: message  # an instance's, for typer's and click's printers
    return error


app = typer.Typer(
    cls=_Group,
    help="normbench: an experiment runner for normalization studies.\n\n"
    "Settings are Hydra overrides: `normbench run norm=layer batch_size=8 lr=0.05`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # markdown: docstrings wrap as paragraphs, and [slurm] in an install hint stays text
    rich_markup_mode="markdown",
)


# Typer's rich help shows a type for every parameter: "<bool>" for a flag as if it took a
# value, "<list[str]>" for a repeatable option. Here a flag shows none, an argument with
# a metavar that alone (in its name's column), a repeatable option its element's type.
def _value_name(original):
    def shown(self, ctx) -> str | None:
        if getattr(self, "is_flag", False):
            return None
        if self.metavar and isinstance(self, typer.core.TyperArgument):
            return None
        text = original(self, ctx)
        return re.sub(r"<list\[(.*)\]>", r"<\1>", text) if text else text

    return shown


typer.core.TyperOption.display_type_rich = _value_name(typer.core.TyperOption.display_type_rich)
typer.core.TyperArgument.display_type_rich = _value_name(typer.core.TyperArgument.display_type_rich)


def _version(value: bool) -> None:
    if value:
        from normbench import __version__

        out.print(f"normbench {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    config_dir: Annotated[
        list[Path] | None,
        typer.Option(
            "--config-dir",
            help="A folder of your own configs, searched after normbench's: "
            "DIR/norm/NAME.yaml with a `_target_` naming your class adds norm=NAME "
            "(repeatable)",
            metavar="DIR",
            show_default=False,
        ),
    ] = None,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """normbench: an experiment runner for normalization studies."""
    from normbench.options import add_config_dir

    # A warning may quote a user's value or a compiler's output: shown cleaned, as text;
    # normbench's notices as one line. So are a bug's traceback and what Hydra or a
    # library logs (a user's overrides as Hydra echoes them in a sweep).
    warnings.showwarning = _show_notice
    sys.excepthook = terminal.show_exception
    terminal.clean_logs()

    try:
        for folder in config_dir or []:
            add_config_dir(folder)
    except UserError as error:
        fail(error)
        raise typer.Exit(2) from None


# Every string printed through these is shown as text, control characters escaped
# (terminal.Console); normbench's own words come styled as rich Text.
out = terminal.Console(soft_wrap=True)
err = terminal.Console(stderr=True, soft_wrap=True)


def fail(error: object) -> None:
    """A user's mistake as one line on stderr: ``error: ...``."""
    err.print(terminal.line("error:", error, "bold red"))


def warn(message: object) -> None:
    """A warning as one line on stderr (a skipped run folder, a selection not made)."""
    err.print(terminal.line("warning:", message))


def _show_notice(message, category, filename, lineno, file=None, line=None) -> None:
    """normbench's notices as one line, ``warning: ...``; other warnings as Python shows
    them, control characters escaped (:func:`normbench.terminal.show_warning`)."""
    if issubclass(category, Notice):
        err.print(terminal.line("warning:", message, "yellow"))
    else:
        terminal.show_warning(message, category, filename, lineno, file, line)


Overrides = Annotated[
    list[str] | None,
    typer.Argument(
        help="Hydra overrides, e.g. norm=layer batch_size=8 model=resnet20, or "
        "norm=sync_bn processes=2 precision=bf16 (data-parallel, mixed precision). "
        "`normbench config` prints every key with its value, `normbench list` the options "
        "of each group",
        metavar="KEY=VALUE",
        show_default=False,
    ),
]


def user_errors(command):
    """Print a UserError as one line and exit with status 2 (its ``exit_status``: 1 for a
    user's code that failed in a run it recorded), without a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as error:
            fail(error)
            raise typer.Exit(getattr(error, "exit_status", 2)) from None

    return wrapper


def kernel_environment() -> None:
    """The kernel's environment variables checked (a UserError), by the commands that run
    it: before any work, and without importing torch for those that do not."""
    from normbench.kernels.cpu import check_environment

    check_environment()


@app.command()
@user_errors
def run(
    overrides: Overrides = None,
    force: Annotated[
        bool, typer.Option("--force", "-f", help="Rerun even if this config already completed.")
    ] = False,
) -> None:
    """Train one experiment and write its run folder (config.yaml, metrics.csv, summary.json)."""
    from normbench.config import compose
    from normbench.interrupts import (
        Interrupted,
        exit_status,
        handle_signals,
        ignore_further_stops,
        reason,
    )
    from normbench.ranks import follower
    from normbench.runner import recorded, resumable
    from normbench.runner import run as run_experiment
    from normbench.views import lines
    from normbench.views.progress import RunProgress

    cfg = None
    try:  # (Ctrl-C while the config is composed, too: it ended the command unsaid)
        kernel_environment()
        cfg = compose(overrides or [])
        with handle_signals(), RunProgress(lines.run_label(cfg), console=err) as progress:
            outcome = run_experiment(cfg, force=force, display=progress)
    except (KeyboardInterrupt, Interrupted) as stop:
        ignore_further_stops()
        if cfg is not None and follower(cfg):  # a SLURM task of rank > 0: rank 0 says it
            raise typer.Exit(exit_status(stop)) from None
        done = recorded(stop)
        # --force starts over: the checkpoint is not the same command's to go on from
        err.print(lines.run_stopped(reason(stop), done, done and not force and resumable(cfg)))
        raise typer.Exit(exit_status(stop)) from None
    # The run is over: the interpreter's exit need not search torch's millions of
    # objects for cycles (it took longer than a run's writing; benchmarks/README.md).
    gc.freeze()
    if outcome.follower:  # rank 0 of the SLURM step says how the run went (`srun -n P`)
        return
    for line in lines.run_outcome(outcome):
        out.print(line)


@app.command()
@user_errors
def sweep(
    overrides: Overrides = None,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="Rerun failed and diverged runs too.")
    ] = False,
) -> None:
    """Run a grid of experiments (norm=custom_bn,layer batch_size=2,8,32) through Hydra's
    multirun; completed runs are skipped; aggregates and plots at the end.

    Launchers: hydra/launcher=joblib hydra.launcher.n_jobs=2 runs jobs in parallel;
    hydra/launcher=submitit_slurm submits them to SLURM (pip install -e ".[slurm]").
    """
    from normbench import sweep as sweeps
    from normbench.interrupts import Interrupted, exit_status, ignore_further_stops, reason
    from normbench.reports import sweep_reports
    from normbench.views import lines
    from normbench.views.progress import SweepProgress

    kernel_environment()
    from normbench.launchers import result_wait_s

    result_wait_s()  # its environment variable checked before any work
    try:
        plan = sweeps.plan(overrides or [], retry_failed=retry_failed)
    except KeyboardInterrupt:  # Ctrl-C, or a norm's own code raising it while checked
        err.print("interrupted by SIGINT (Ctrl-C): the sweep stopped while planning; nothing ran")
        raise typer.Exit(130) from None
    for line in lines.sweep_plan(plan):
        err.print(line)
    try:
        with SweepProgress(plan, console=err) as progress:
            sweeps.launch(plan, display=progress)
    except (KeyboardInterrupt, Interrupted) as stop:
        ignore_further_stops()
        err.print(lines.sweep_stopped(plan, reason(stop)))
        raise typer.Exit(exit_status(stop)) from None
    if plan.refused:
        raise UserError(f"the scheduler refused the sweep's jobs: {plan.launcher_error}")
    counts = plan.outcome()
    if plan.launcher_error:
        err.print(f"sweep: the launcher failed: {plan.launcher_error}")
    settings = plan.jobs[0].cfg.report if plan.jobs else None
    logger = plan.jobs[0].cfg.get("logger") if plan.jobs else None
    for renderable in sweep_reports(plan.experiment_dirs, settings, warn, err.print, logger):
        out.print(renderable)
    out.print(lines.sweep_counts(counts))
    if counts["failed"] or counts["interrupted"] or counts["not run"]:
        raise typer.Exit(1)


@app.command()
@user_errors
def results(
    dirs: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Experiment folders (OUT_DIR/NAME), or folders holding them "
            "(default: every one under results/)",
            metavar="DIR",
            show_default=False,
            readable=False,  # checked by normbench, in one line (click's is a boxed usage)
        ),
    ] = None,
    group_by: Annotated[
        list[str] | None,
        typer.Option(
            "--group-by",
            "-g",
            help="Group the table by this key instead of every swept key; repeat for "
            "several, or separate them with commas (norm, batch_size, lr, model, "
            "optim.momentum, a recorded field: norm,norm_batch_size)",
            metavar="KEY",
            show_default=False,
        ),
    ] = None,
    select: Annotated[
        list[str] | None,
        typer.Option(
            "--select",
            help="Tune this swept key on validation: for every group of the other swept keys, "
            "the value with the best mean validation accuracy, and the test accuracy there "
            "(selected.csv); repeat to tune several jointly",
            metavar="KEY",
            show_default=False,
        ),
    ] = None,
    baseline: Annotated[
        str | None,
        typer.Option(
            help="The norm the others are compared with (difference, 95% CI, p: paired by "
            "seed where both ran the same seeds, else Welch's; default: custom_bn when present)",
            metavar="NORM",
            show_default=False,
        ),
    ] = None,
    compare: Annotated[
        bool,
        typer.Option(
            "--compare",
            help="One table of all the experiments side by side, with an experiment column, "
            "instead of one table each",
        ),
    ] = False,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="table (rich, the default), or markdown, latex, csv: the tables' CSV columns "
            "as text to paste (counts and files written go to stderr)",
            metavar="FORMAT",
        ),
    ] = "table",
    stale_threshold: Annotated[
        float | None,
        typer.Option(
            help="Flag stale_running_stats above this mean |PreciseBN - running averages|, "
            "in accuracy points (default: report.stale_threshold)",
            metavar="POINTS",
            show_default=False,
        ),
    ] = None,
    undertrained_gap: Annotated[
        float | None,
        typer.Option(
            help="Flag under_trained this far below the table's best training accuracy, in "
            "accuracy points (default: report.undertrained_gap)",
            metavar="POINTS",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Aggregate run folders into runs.csv, runs.parquet, metrics.csv, summary.csv and
    report.md per experiment, and print mean ± std of test accuracy over seeds per group,
    the differences to the baseline with their test, and a warning line per flag."""
    from normbench.reports import report, thresholds_of

    printed = report(
        dirs,
        group_by,
        warn=warn,
        select=select,
        baseline=baseline,
        compare=compare,
        fmt=fmt,
        thresholds=thresholds_of(stale_threshold, undertrained_gap),
        note=err.print,
    )
    for renderable in printed:
        out.print(renderable)


@app.command()
@user_errors
def config(overrides: Overrides = None) -> None:
    """Print the composed config as YAML."""
    from normbench.config import compose

    cfg = compose(overrides or [])
    sys.stdout.write(terminal.yaml(cfg))


@app.command()
@user_errors
def plot(
    dirs: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Experiment folders (OUT_DIR/NAME), or folders holding them "
            "(default: every one under results/)",
            metavar="DIR",
            show_default=False,
            readable=False,  # checked by normbench, in one line (click's is a boxed usage)
        ),
    ] = None,
    fmt: Annotated[
        str,  # checked by normbench, in one line (a Literal's is click's boxed usage)
        typer.Option(
            "--format",
            metavar="[png|pdf|svg]",  # normbench.views.figures.FIGURE_FORMATS (a test holds)
            help="File format: png (150 dpi), or pdf and svg (vector, text kept as text "
            "a paper's editor can change)",
        ),
    ] = "png",
    log_error: Annotated[
        bool,
        typer.Option(
            "--log-error",
            help="Logarithmic test-error axes (error vs batch size, BatchNorm at inference): "
            "small errors apart",
        ),
    ] = False,
    x: Annotated[
        str,  # checked by normbench, in one line
        typer.Option(
            "--x",
            metavar="[batch_size|norm_batch_size]",  # normbench.schema.config.X_AXES (a test)
            help="The error figure's x axis: batch_size (the global batch) or norm_batch_size "
            "(what one BatchNorm normalizes over: sync_bn's groups, ghost batches and processes "
            "as points along one line)",
        ),
    ] = "batch_size",
) -> None:
    """Draw each experiment's figures into its plots folder: test error vs batch size per
    norm (log2 axis, 95% CI over seeds; the runs chosen on validation when there is a
    selected.csv), test accuracy per epoch, and BatchNorm's statistics at inference."""
    from normbench.reports import plot_experiments

    for path in plot_experiments(dirs, warn=warn, fmt=fmt, log_error=log_error, x=x):
        out.print(str(path))


@app.command(name="check-norm")
@user_errors
def check_norm(
    target: Annotated[
        str,
        typer.Argument(
            metavar="CLASS",
            help="Your class as a dotted path (mypkg.norms.MyNorm), or a norm's name",
            show_default=False,
        ),
    ],
) -> None:
    """Run the checks every normalization variant passes on a class of your own: it
    builds from (num_channels), keeps shape and dtype in training and eval, survives a
    state_dict round trip, passes gradients to every parameter and works in a model.
    Exit status 1 when a check fails."""
    from normbench.checknorm import check_norm as run_checks
    from normbench.norms.registry import norm_class
    from normbench.views import lines

    kernel_environment()
    try:
        results = run_checks(norm_class(target))
    except KeyboardInterrupt:  # Ctrl-C, or the class's own code raising it
        err.print("interrupted by SIGINT (Ctrl-C): the checks stopped, none is reported")
        raise typer.Exit(130) from None
    out.print(lines.checks_table(target, results))
    failed = [r for r in results if not r.passed]
    if failed:
        for result in failed:  # whole lines, as the table may wrap them
            err.print(f"FAILED {result.name}: {result.detail}", soft_wrap=True)
        err.print(terminal.styled((f"{len(failed)} of {len(results)} checks failed", "bold red")))
        raise typer.Exit(1)
    out.print(f"all {len(results)} checks passed: norm={target} is ready for a sweep")


@app.command(name="list")
@user_errors
def list_options() -> None:
    """List the available options of every config group."""
    from normbench.config import default_options, describe_groups
    from normbench.views.lines import options_table

    out.print(options_table(describe_groups(), default_options()))


@app.command()
@user_errors
def bench(
    shape: Annotated[
        list[str] | None,
        typer.Option(
            help="An input shape N,C,H,W; repeat the option for several (default: "
            + " ".join(",".join(map(str, s)) for s in DEFAULT_SHAPES)
            + ")",
            show_default=False,
        ),
    ] = None,
    impl: Annotated[
        list[str] | None,
        typer.Option(
            help="torch, reference, cpu or triton; repeat the option for several "
            "(default: every one that runs on the device)",
            show_default=False,
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA when available), cpu or cuda")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, float16, bfloat16 or float64")] = "float32",
    memory_format: Annotated[
        str,
        typer.Option(help="The inputs' layout: contiguous (NCHW) or channels_last (NHWC)"),
    ] = "contiguous",
    repeats: Annotated[
        int, typer.Option(help="Timed units per implementation and shape (medians over them)")
    ] = DEFAULT_REPEATS,
    warmup: Annotated[
        int, typer.Option(help="Untimed units per implementation and shape first")
    ] = DEFAULT_WARMUP,
    threads: Annotated[
        int | None,
        typer.Option(help="torch.set_num_threads (default: torch's)", show_default=False),
    ] = None,
    out_path: Annotated[Path, typer.Option("--out", help="Where the CSV goes")] = DEFAULT_OUT,
) -> None:
    """Time BatchNorm2d training forward+backward: normbench's kernels against torch's.

    Implementations and a memory copy of the same size run interleaved, repeat after
    repeat; a copy of arrays larger than the caches measures the machine's copy
    bandwidth. Prints medians, interquartile ranges, GB/s, speedup vs torch and the
    fractions of both copies' bandwidths; writes them as a CSV, one row per (shape, impl).
    """
    from normbench import bench as benchmark
    from normbench.views.progress import RichProgress
    from normbench.views.tables import bench_table

    kernel_environment()
    try:
        with RichProgress(console=err) as progress:
            frame = benchmark.bench_to_csv(
                out_path,
                shape,
                impl,
                device=device,
                dtype=dtype,
                repeats=repeats,
                warmup=warmup,
                threads=threads,
                memory_format=memory_format,
                progress=progress,
            )
    except KeyboardInterrupt:
        err.print("interrupted: nothing written")
        raise typer.Exit(130) from None
    out.print(bench_table(frame, benchmark.COPY))
    out.print(f"wrote {out_path}")


if __name__ == "__main__":
    app()

"""normbench's command line: Typer commands that parse, call one function and print.

torch, Hydra and pandas are imported inside the commands, so ``normbench --help``
answers at once. A :class:`~normbench.errors.UserError` becomes one message on
stderr and exit status 2.
"""

from __future__ import annotations

import functools
import sys
from typing import Annotated

import typer
from rich.console import Console

from normbench.errors import UserError

app = typer.Typer(
    help="normbench: an experiment runner for normalization studies.\n\n"
    "Settings are Hydra overrides: `normbench run norm=layer batch_size=8 lr=0.05`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

Overrides = Annotated[
    list[str] | None,
    typer.Argument(
        help="Hydra overrides, e.g. norm=layer batch_size=8 model=resnet20", show_default=False
    ),
]


def user_errors(command):
    """Print a UserError as one line and exit with status 2, without a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as error:
            err.print(f"[bold red]error:[/] {error}")
            raise typer.Exit(2) from None

    return wrapper


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
    from normbench.progress import RunProgress
    from normbench.runner import run as run_experiment

    cfg = compose(overrides or [])
    label = f"{cfg.norm.name} bs={cfg.batch_size}"
    try:
        with RunProgress(label, console=err) as progress:
            outcome = run_experiment(cfg, force=force, display=progress)
    except KeyboardInterrupt:
        err.print(
            "interrupted: the run has no summary and counts as not done; run again to redo it"
        )
        raise typer.Exit(130) from None
    summary = outcome.summary
    where = outcome.run_dir
    if outcome.skipped:
        out.print(f"already done ({summary['status']}), skipped; --force reruns it")
    if summary["status"] == "diverged":
        out.print(f"[yellow]diverged[/]: {summary['error']} · {where}")
        return
    out.print(
        f"test acc {100 * summary['final_test_acc']:.2f}% "
        f"(best {100 * summary['best_test_acc']:.2f}%) · {where}"
    )


@app.command()
@user_errors
def config(overrides: Overrides = None) -> None:
    """Print the composed config as YAML."""
    from omegaconf import OmegaConf

    from normbench.config import compose

    cfg = compose(overrides or [])
    sys.stdout.write(OmegaConf.to_yaml(cfg, resolve=True))


@app.command(name="list")
def list_options() -> None:
    """List the available options of every config group."""
    from rich.markup import escape
    from rich.table import Table

    from normbench.config import default_options, describe_groups

    defaults = default_options()
    table = Table(title="config groups: pick an option with group=option (* the default)")
    table.add_column("group", style="bold")
    table.add_column("option", style="cyan")
    table.add_column("description")
    for group, options in describe_groups().items():
        for i, (option, description) in enumerate(options):
            marker = " *" if defaults.get(group) == option else ""
            table.add_row(group if i == 0 else "", option + marker, escape(description))
        table.add_section()
    out.print(table)


if __name__ == "__main__":
    app()

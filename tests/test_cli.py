"""Tests for normbench.cli through Typer's CliRunner: the commands and every bad input."""

import json
import subprocess
import sys

import pandas as pd
import pytest
from typer.testing import CliRunner

from normbench.cli import app
from normbench.config import GROUPS, group_options
from normbench.rundir import METRIC_COLUMNS, SUMMARY_FIELDS

cli = CliRunner()


def invoke(*args):
    return cli.invoke(app, list(args))


def test_help_does_not_import_torch():
    code = (
        "import sys\nfrom normbench.cli import app\n"
        "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules and 'hydra' not in sys.modules, 'heavy import'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "run" in done.stdout and "config" in done.stdout


COMMANDS = ["run", "sweep", "results", "plot", "config", "list", "bench", "check-norm"]


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_is_whole_and_shows_no_python_types(command):
    """Help as a terminal shows it: flags take no "<bool>", repeatable options show no
    "<list[str]>", and markup never eats text ("[slurm]", "_target_", "NAME")."""
    result = cli.invoke(app, [*filter(None, [command]), "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "<bool>" not in text and "<list[" not in text
    if command == "sweep":
        assert 'pip install -e ".[slurm]"' in text
    if command == "":
        assert "DIR/norm/NAME.yaml with a _target_ naming your class" in text
        assert "--version" in text
    if command in ("results", "plot"):
        assert "Experiment folders (OUT_DIR/NAME)" in text


def test_version_prints_the_package_version():
    from normbench import __version__

    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"normbench {__version__}"


def test_run_end_to_end_on_digits(tmp_path):
    out = tmp_path / "results"
    result = invoke("run", "epochs=1", f"out_dir={out}")
    assert result.exit_code == 0, result.output
    runs = list((out / "default" / "runs").iterdir())
    assert len(runs) == 1
    folder = runs[0]
    names = {p.name for p in folder.iterdir()}
    assert names == {"config.yaml", "metrics.csv", "summary.json", "bn_stats.csv"}
    summary = json.loads((folder / "summary.json").read_text())
    assert set(SUMMARY_FIELDS) <= set(summary)
    assert summary["status"] == "completed" and summary["norm"] == "custom_bn"
    assert list(pd.read_csv(folder / "metrics.csv").columns) == list(METRIC_COLUMNS)
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith(f"test acc {100 * summary['final_test_acc']:.2f}%")
    assert str(folder) in last

    again = invoke("run", "epochs=1", f"out_dir={out}")
    assert again.exit_code == 0 and "skipped" in again.stdout


def test_config_prints_the_composed_yaml():
    result = invoke("config", "norm=group", "norm.groups=4", "batch_size=8")
    assert result.exit_code == 0
    import yaml

    cfg = yaml.safe_load(result.stdout)
    assert cfg["norm"] == {"name": "group", "groups": 4, "eps": cfg["norm"]["eps"]}
    assert cfg["batch_size"] == 8


def test_list_shows_every_group_and_option():
    result = invoke("list")
    assert result.exit_code == 0
    for group in GROUPS:
        assert group in result.stdout
        for option in group_options(group):
            assert option in result.stdout


BAD = [
    (["norm=batchnorm"], "unknown norm 'batchnorm'"),
    (["model=vgg"], "unknown model 'vgg'"),
    (["dataset=imagenet"], "unknown dataset 'imagenet'"),
    (["optim=lion"], "unknown optim 'lion'"),
    (["batch_size=0"], "batch_size must be"),
    (["batch_size=100000"], "larger than the training set"),
    (["lr=0"], "lr must be"),
    (["lr=-1"], "lr must be"),
    (["epochs=0"], "epochs must be"),
    (["bogus=1"], "unknown config key 'bogus'"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_exits_2_with_one_message_and_writes_nothing(tmp_path, args, message):
    result = invoke("run", f"out_dir={tmp_path / 'results'}", *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert not (tmp_path / "results").exists()


def test_cuda_without_cuda(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = invoke("run", f"out_dir={tmp_path / 'results'}", "device=cuda")
    assert result.exit_code == 2 and "CUDA is not available" in result.stderr
    assert not (tmp_path / "results").exists()


def test_missing_data_set_names_the_path_and_files(tmp_path):
    root = tmp_path / "data"
    result = invoke(
        "run", f"out_dir={tmp_path / 'results'}", "dataset=mnist", f"dataset.root={root}"
    )
    assert result.exit_code == 2
    assert str(root) in result.stderr and "train-images-idx3-ubyte" in result.stderr
    assert not (tmp_path / "results").exists() and not root.exists()


def test_failed_download_says_where_to_place_the_files(tmp_path, monkeypatch):
    import torchvision

    def offline(self, *args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    root = tmp_path / "data"
    result = invoke(
        "run",
        f"out_dir={tmp_path / 'results'}",
        "dataset=cifar10",
        f"dataset.root={root}",
        "dataset.download=true",
    )
    assert result.exit_code == 2
    assert "download" in result.stderr and str(root) in result.stderr
    assert not (tmp_path / "results").exists()


def test_ctrl_c_while_the_config_is_composed_is_one_line_too(monkeypatch):
    """A Ctrl-C in the second or so that Hydra composes the config ended the command with
    status 130 and not a word; it says what the one after it says."""
    import normbench.config

    def interrupted(overrides):
        raise KeyboardInterrupt

    monkeypatch.setattr(normbench.config, "compose", interrupted)
    result = invoke("run", "epochs=1")
    assert result.exit_code == 130
    assert "interrupted by SIGINT (Ctrl-C): stopped before the run trained" in result.output

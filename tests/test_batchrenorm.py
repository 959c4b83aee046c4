"""Tests for Batch Renorm's schedule in terms of the run (normbench.norms.batchrenorm's
schedule_steps, the config's checks in normbench.validation, the runner resolving it and
recording renorm_ramp_end_step): shares of the run's steps against hand-computed counts,
for the epochs and steps budgets and max_steps; a count given wins; the errors."""

from __future__ import annotations

import pytest

from normbench import build, runner
from normbench.errors import UserError
from normbench.norms.batchrenorm import BatchRenorm, BatchRenorm2d, ramp_end_step, schedule_steps

SHARES = {"warmup_fraction": 0.04, "ramp_fraction": 0.27, "warmup_steps": None, "ramp_steps": None}


@pytest.mark.parametrize(
    ("given", "total", "warmup", "ramp"),
    [
        # Ioffe's run, ~130k steps: 5,200 of plain BatchNorm, relaxed by 40,300
        (SHARES, 130_000, 5200, 35_100),
        (SHARES, 168, 7, 45),  # 0.04 * 168 = 6.72 -> 7; 0.31 * 168 = 52.08 -> 52 (end)
        (SHARES, 10, 0, 3),  # 0.4 -> 0; 3.1 -> 3
        # a count given wins over its phase's share; the other phase's share of the run
        ({**SHARES, "warmup_steps": 500}, 1000, 500, 270),
        ({**SHARES, "ramp_steps": 2000}, 1000, 40, 2000),
        ({**SHARES, "warmup_steps": 500, "ramp_steps": 2000}, 10, 500, 2000),
        # the ends rounded from the cumulative shares: never past the run
        ({**SHARES, "warmup_fraction": 0.5, "ramp_fraction": 0.5}, 3, 2, 1),
        ({**SHARES, "warmup_fraction": 0.0, "ramp_fraction": 1.0}, 7, 0, 7),
    ],
)
def test_shares_become_steps(given, total, warmup, ramp):
    got = schedule_steps({"eps": 1e-5, **given}, total)
    assert got == {"eps": 1e-5, "warmup_steps": warmup, "ramp_steps": ramp}
    assert ramp_end_step(got) == warmup + ramp
    BatchRenorm2d(3, **got)  # what the layer takes: no share left


def test_arguments_without_shares_pass_unchanged():
    """A variant given in steps only (a user's, a Python caller's) or without a schedule."""
    steps = {"warmup_steps": 5, "ramp_steps": 6}
    assert schedule_steps(steps, 100) is steps
    assert ramp_end_step({"eps": 1e-5}) is None and ramp_end_step(steps) == 11
    # a variant with a warm-up share and no ramp at all
    assert schedule_steps({"warmup_fraction": 0.5}, 10) == {"warmup_steps": 5}


def test_a_phase_with_neither_share_nor_count_is_refused():
    with pytest.raises(ValueError, match="ramp_steps and ramp_fraction are both null"):
        schedule_steps({**SHARES, "ramp_fraction": None}, 100)


# ----------------------------------------------------------------------- the config


def test_the_default_is_a_share_of_the_run(tiny):
    norm = tiny("norm=batch_renorm").norm
    assert (norm.warmup_fraction, norm.ramp_fraction) == (0.04, 0.27)
    assert norm.warmup_steps is None and norm.ramp_steps is None


def test_a_count_nulls_its_phases_share(tiny):
    """Ioffe's counts still accepted: the count wins, and the share it overrides is null in
    the composed config, so that it changes no run id."""
    norm = tiny("norm=batch_renorm", "norm.warmup_steps=500").norm
    assert (norm.warmup_fraction, norm.warmup_steps) == (None, 500)
    assert (norm.ramp_fraction, norm.ramp_steps) == (0.27, None)
    same = [tiny("norm=batch_renorm", "norm.warmup_steps=500", f"norm.warmup_fraction={f}")
            for f in (0.1, 0.2)]  # fmt: skip
    assert runner.run_id(same[0]) == runner.run_id(same[1])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["norm.warmup_fraction=1.5"], "norm.warmup_fraction must be a number >= 0 and <= 1"),
        (["norm.ramp_fraction=-0.1"], "norm.ramp_fraction must be a number >= 0 and <= 1"),
        (["norm.ramp_fraction=abc"], "norm.ramp_fraction must be a number"),
        (
            ["norm.warmup_fraction=0.6", "norm.ramp_fraction=0.5"],
            "norm.warmup_fraction=0.6 + norm.ramp_fraction=0.5 must be at most 1",
        ),
        (
            ["norm.warmup_fraction=null"],
            "norm.warmup_fraction and norm.warmup_steps are both null: set one of them",
        ),
        (["norm.ramp_steps=-1"], "norm.ramp_steps must be an integer >= 0 or null"),
    ],
)
def test_bad_schedules_are_one_line_naming_the_key(tiny, overrides, message):
    with pytest.raises(UserError) as caught:
        tiny("norm=batch_renorm", *overrides)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_shares_summing_to_one_with_rounding_pass(tiny):
    tiny("norm=batch_renorm", "norm.warmup_fraction=0.7", "norm.ramp_fraction=0.3")


def test_other_variants_have_no_schedule_keys(tiny):
    """norm=layer's config, and so its run id, holds none of Batch Renorm's keys."""
    assert set(tiny("norm=layer").norm) == {"name", "eps"}


# ----------------------------------------------------------------------- the run


@pytest.mark.parametrize(
    ("overrides", "total"),
    [
        # epochs: 2 x (256 // 64) steps
        (["epochs=2"], 8),
        # steps: the steps of 2 epochs at ref_batch_size=32, 2 x (256 // 32), at batch 64
        (["epochs=2", "budget=steps", "ref_batch_size=32"], 16),
        (["max_steps=5"], 5),  # max_steps wins over both
    ],
)
def test_the_runner_builds_the_layers_from_the_runs_steps(tiny, overrides, total):
    cfg = tiny("norm=batch_renorm", "norm.warmup_fraction=0.25", "norm.ramp_fraction=0.5",
               *overrides)  # fmt: skip
    prepared = build.prepare(cfg)
    assert prepared.settings.total_steps(256) == total
    layers = [m for m in prepared.model.modules() if isinstance(m, BatchRenorm)]
    assert layers
    warmup = int(0.25 * total + 0.5)
    for layer in layers:
        assert (layer.warmup_steps, layer.ramp_steps) == (warmup, int(0.75 * total + 0.5) - warmup)


def test_the_run_records_where_its_ramp_ends(tiny):
    """renorm_ramp_end_step: warm-up plus ramp in steps; a run shorter than it shows so."""
    short = runner.run(tiny("norm=batch_renorm", "norm.warmup_steps=500")).summary
    assert short["steps"] == 4 and short["renorm_ramp_end_step"] == 500 + 1  # 0.27 * 4 -> 1
    whole = runner.run(tiny("norm=batch_renorm", "epochs=2")).summary
    assert whole["renorm_ramp_end_step"] == 2 and whole["steps"] == 8  # 0.31 * 8 = 2.48
    assert runner.run(tiny("norm=custom_bn")).summary["renorm_ramp_end_step"] is None

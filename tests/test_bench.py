"""Tests for normbench.bench and ``normbench bench``: the frame, its figures, the CLI, bad input.

Tiny shapes and a few repeats: the point is the bookkeeping, not the timings.
"""

import math
from unittest import mock

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from normbench import allocator, bench
from normbench.cli import app
from normbench.errors import UserError
from normbench.views.tables import bench_table

TINY = (4, 3, 5, 5)  # 300 values
MACHINE_BYTES = 1 << 20  # the machine copy's arrays in these tests: small, the point is bookkeeping
cli = CliRunner()


@pytest.fixture(scope="module")
def frame():
    return bench.run_bench(
        [TINY],
        ["torch", "reference", "cpu"],
        device="cpu",
        repeats=3,
        warmup=1,
        threads=1,
        machine_bytes=MACHINE_BYTES,
    )


@pytest.fixture
def small_machine_copy(monkeypatch):
    """The CLI's machine copy at MACHINE_BYTES, whatever the caches here."""
    monkeypatch.setattr(bench, "machine_copy_bytes", lambda device: MACHINE_BYTES)


def test_frame_has_one_row_per_impl_and_the_copy(frame):
    assert list(frame.columns) == list(bench.COLUMNS)
    assert list(frame["impl"]) == ["torch", "reference", "cpu", "copy"]
    assert (frame["shape"] == "4x3x5x5").all() and (frame["numel"] == 300).all()
    assert (frame["device"] == "cpu").all() and (frame["threads"] == 1).all()
    assert (frame["repeats"] == 3).all() and (frame["torch_version"] == torch.__version__).all()
    assert list(frame["dtype"]) == ["float32"] * 4
    assert (frame["memory_format"] == "contiguous").all()
    assert (frame["page_faults"] >= 0).all()
    # glibc here: run_bench keeps freed memory, as training runs do (normbench.allocator)
    assert (frame["malloc"] == ("kept" if allocator.tuned() else "system")).all()


def test_times_are_positive_and_ordered(frame):
    assert (frame["min_ms"] > 0).all()
    assert (frame["min_ms"] <= frame["q1_ms"]).all()
    assert (frame["q1_ms"] <= frame["median_ms"]).all()
    assert (frame["median_ms"] <= frame["q3_ms"]).all()


def test_derived_figures_are_as_documented(frame):
    rows = frame.set_index("impl")
    assert rows.loc["torch", "speedup_vs_torch"] == 1.0
    assert math.isnan(rows.loc["copy", "speedup_vs_torch"])
    assert (rows.loc[["torch", "reference", "cpu"], "bytes"] == 5 * 300 * 4).all()
    assert rows.loc["copy", "bytes"] == 2 * 300 * 4
    expected_gbps = frame["bytes"] / (frame["median_ms"] / 1e3) / 1e9
    assert frame["gbps"].tolist() == pytest.approx(expected_gbps.tolist())
    for impl in ("reference", "cpu"):
        torch_ms, ms = rows.loc["torch", "median_ms"], rows.loc[impl, "median_ms"]
        assert rows.loc[impl, "speedup_vs_torch"] == pytest.approx(torch_ms / ms)
    assert frame["frac_of_copy_bw"].tolist() == pytest.approx(
        (frame["gbps"] / rows.loc["copy", "gbps"]).tolist()
    )
    assert (frame["machine_copy_bytes"] == MACHINE_BYTES).all()
    machine = frame["machine_copy_gbps"]
    assert machine.iloc[0] > 0 and (machine == machine.iloc[0]).all()
    assert frame["frac_of_machine_bw"].tolist() == pytest.approx((frame["gbps"] / machine).tolist())


def test_the_cpu_kernels_streaming_threshold_is_reported(frame):
    expected = torch.ops.normbench.stream_threshold()
    assert (frame["stream_bytes"] == expected).all()


def test_the_cpu_kernels_plane_order_is_reported(frame):
    orders = frame.set_index("impl")["plane_order"]
    assert orders["cpu"] == "channels/channels"  # 1.2 KB: within any core's L2
    assert orders.drop("cpu").isna().all()


def test_a_forced_plane_order_is_reported(monkeypatch):
    monkeypatch.setenv("NORMBENCH_KERNEL_PLANE_ORDER", "samples")
    frame = bench.run_bench(
        [TINY], ["cpu"], device="cpu", repeats=1, warmup=0, machine_bytes=MACHINE_BYTES
    )
    assert frame.set_index("impl").loc["cpu", "plane_order"] == "samples/samples"


def test_channels_last_inputs_are_timed_in_the_kernels_row_order():
    frame = bench.run_bench(
        [TINY], ["torch", "cpu"], device="cpu", repeats=1, warmup=0,
        machine_bytes=MACHINE_BYTES, memory_format="channels_last",
    )  # fmt: skip
    assert (frame["memory_format"] == "channels_last").all()
    assert frame.set_index("impl").loc["cpu", "plane_order"] == "rows/rows"
    # what each implementation is handed: the input and its gradient channels_last
    units = bench._units(["cpu"], TINY, "cpu", "float32", "channels_last")
    prepare, run = units["cpu"]
    seen = []
    original = torch.Tensor.backward

    def spy(y, dy, *args, **kwargs):
        seen.append((y, dy))
        return original(y, dy, *args, **kwargs)

    with mock.patch.object(torch.Tensor, "backward", spy):
        prepare()
        run()
    ((y, dy),) = seen
    assert dy.is_contiguous(memory_format=torch.channels_last) and not dy.is_contiguous()
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()


def test_without_the_cpu_kernel_timed_no_streaming_threshold_is_reported():
    frame = bench.run_bench(
        [TINY], ["torch"], device="cpu", repeats=1, warmup=0, machine_bytes=MACHINE_BYTES
    )
    assert frame["stream_bytes"].isna().all()
    assert "streams" not in str(bench_table(frame, bench.COPY).caption)


@pytest.mark.parametrize(
    ("nbytes", "text"), [(8 << 20, "8 MiB"), (1536, "1.5 KiB"), (1000, "1000 bytes")]
)
def test_the_caption_names_the_streaming_threshold(frame, nbytes, text):
    assert f"cpu streams outputs from {text} on" in str(
        bench_table(frame.assign(stream_bytes=nbytes), bench.COPY).caption
    )


def test_threads_are_restored():
    before = torch.get_num_threads()
    bench.run_bench(
        [TINY], ["torch"], device="cpu", repeats=1, warmup=0, threads=1, machine_bytes=MACHINE_BYTES
    )
    assert torch.get_num_threads() == before


def test_summary_statistics_of_known_samples():
    config = bench.settings(
        [(2, 1, 1, 1)], ["torch", "reference"], device="cpu", dtype="float64", machine_bytes=1000
    )
    times = {"torch": [1, 2, 3, 4, 100], "reference": [4, 4, 4, 4, 4], "copy": [0.5] * 5}
    faults = {"torch": [0, 0, 0, 0, 10], "reference": [0] * 5, "copy": [0] * 5}
    machine_ms = [0.2, 0.1, 0.4]  # the median: 2 x 1000 bytes in 0.2 ms
    samples = pd.DataFrame(
        [
            ("2x1x1x1", impl, i, ms / 1e3, faults[impl][i])
            for impl, ms_list in times.items()
            for i, ms in enumerate(ms_list)
        ]
        + [(bench.MACHINE, "copy", i, ms / 1e3, 0) for i, ms in enumerate(machine_ms)],
        columns=["shape", "impl", "repeat", "seconds", "faults"],
    )
    rows = bench.timings(samples, config, threads=1).set_index("impl")
    assert rows.loc["torch", ["median_ms", "q1_ms", "q3_ms", "min_ms"]].tolist() == pytest.approx(
        [3, 2, 4, 1]
    )
    assert rows.loc["reference", "speedup_vs_torch"] == pytest.approx(3 / 4)
    assert rows.loc["torch", "bytes"] == 5 * 2 * 8  # float64
    assert rows.loc["torch", "gbps"] == pytest.approx(80 / 3e-3 / 1e9)
    assert rows.loc["copy", "gbps"] == pytest.approx(16 / 0.5e-3 / 1e9)
    assert rows.loc["torch", "frac_of_copy_bw"] == pytest.approx((80 / 3) / (16 / 0.5))
    assert rows["machine_copy_gbps"].tolist() == pytest.approx([2000 / 0.2e-3 / 1e9] * 3)
    assert rows.loc["torch", "frac_of_machine_bw"] == pytest.approx((80 / 3) / (2000 / 0.2))
    assert list(rows.index) == ["torch", "reference", "copy"]  # no row of its own
    assert rows.loc["torch", "page_faults"] == 2.0  # the mean: rare faults still show
    assert rows.loc["reference", "page_faults"] == 0.0


def test_the_machine_copy_is_timed_before_the_shapes_and_after_each_block(monkeypatch):
    # interleaved with the shapes, so a change of load mid-run moves both alike
    calls = []
    timed_units = []
    real_copy = bench.copy_seconds

    def recording_copy(nbytes, repeats, device="cpu", sync=lambda: None):
        calls.append((len(timed_units), repeats))
        return real_copy(nbytes, repeats, device, sync)

    real_units = bench._units

    def recording_units(impls, shape, device, dtype, memory_format):
        def counted(unit):
            prepare, run = unit

            def run_counted():
                timed_units.append(shape)
                run()

            return prepare, run_counted

        units = real_units(impls, shape, device, dtype, memory_format)
        return {name: counted(u) for name, u in units.items()}

    monkeypatch.setattr(bench, "copy_seconds", recording_copy)
    monkeypatch.setattr(bench, "_units", recording_units)
    monkeypatch.setattr(bench, "BLOCK", 2)
    config = bench.settings(
        [TINY], ["torch"], device="cpu", repeats=5, warmup=0, machine_bytes=MACHINE_BYTES
    )
    samples = bench.measure(config)
    # per block of 2 repeats: an untimed round and the timed ones, torch and the copy each
    block_units = [2 * (1 + 2), 2 * (1 + 2), 2 * (1 + 1)]
    ends = [sum(block_units[: i + 1]) for i in range(3)]
    assert calls == [(0, bench.MACHINE_REPEATS_FIRST)] + [
        (end, bench.MACHINE_REPEATS_PER_BLOCK) for end in ends
    ]
    machine = samples[samples["shape"] == bench.MACHINE]
    assert len(machine) == bench.MACHINE_REPEATS_FIRST + 3 * bench.MACHINE_REPEATS_PER_BLOCK
    assert machine["repeat"].tolist() == list(range(1, len(machine) + 1))
    assert (machine["seconds"] > 0).all()


@pytest.mark.parametrize(
    "cache, expected",
    [(None, 1 << 30), (1 << 20, 64 << 20), (100 << 20, 400 << 20), (480 << 20, 1 << 30)],
)
def test_the_machine_copy_is_four_times_the_largest_cache_within_bounds(
    monkeypatch, cache, expected
):
    monkeypatch.setattr(bench, "largest_cache_bytes", lambda device: cache)
    assert bench.machine_copy_bytes("cpu") == expected
    assert bench.settings([TINY], device="cpu").machine_bytes == expected


def test_the_largest_cache_is_read_from_sysfs(tmp_path, monkeypatch):
    for index, size in enumerate(["48K", "2048K", "491520K", "n/a"]):
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "size").write_text(size + "\n")
    monkeypatch.setattr(bench, "CPU_CACHES", tmp_path)
    assert bench.largest_cache_bytes("cpu") == 480 << 20
    monkeypatch.setattr(bench, "CPU_CACHES", tmp_path / "absent")
    assert bench.largest_cache_bytes("cpu") is None


def test_a_level_of_cache_is_read_from_sysfs(fake_cpu_caches):
    fake_cpu_caches([("1", "Data", "48K"), ("1", "Instruction", "64K"), ("2", "Unified", "2M"),
                     ("3", "Unified", "491520K")])  # fmt: skip
    assert bench.cpu_cache_bytes(1) == 48 << 10  # the data cache, not the instructions'
    assert bench.cpu_cache_bytes(2) == 2 << 20
    assert bench.cpu_cache_bytes(4) is None
    assert bench.cpu_cache_bytes() == bench.largest_cache_bytes("cpu") == 480 << 20


def test_on_cuda_the_largest_cache_is_the_gpus_l2(monkeypatch):
    class Properties:
        L2_cache_size = 50 << 20

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Properties())
    assert bench.largest_cache_bytes("cuda") == 50 << 20
    assert bench.machine_copy_bytes("cuda") == 200 << 20


def test_default_impls_on_the_cpu_leave_triton_out():
    config = bench.settings(device="cpu")
    assert config.impls == ("torch", "reference", "cpu")
    assert [impl for impl, _ in config.skipped] == ["triton"]
    assert config.shapes == bench.DEFAULT_SHAPES


@pytest.mark.parametrize("text", ["4,3,5", "4,3,5,5,5", "a,b,c,d", "4,0,5,5", "", "4,-3,5,5"])
def test_malformed_shapes_are_refused(text):
    with pytest.raises(UserError, match="bad shape"):
        bench.parse_shape(text)


def test_shapes_parse_with_commas_or_x():
    assert bench.parse_shape("128,16,32,32") == (128, 16, 32, 32)
    assert bench.parse_shape("128x16x32x32") == (128, 16, 32, 32)


BAD_SETTINGS = [
    ({"impls": ["fast"]}, "unknown impl 'fast'"),
    ({"impls": ["triton"], "device": "cpu"}, "impl 'triton' cannot run here"),
    ({"shapes": [(1, 3, 1, 1)]}, "N*H*W must be at least 2"),
    ({"dtype": "int8"}, "unknown dtype 'int8'"),
    ({"device": "tpu"}, "unknown device 'tpu'"),
    ({"repeats": 0}, "--repeats must be at least 1"),
    ({"warmup": -1}, "--warmup must be at least 0"),
    ({"threads": 0}, "--threads must be at least 1"),
    ({"machine_bytes": 2}, "machine_bytes must be at least 4"),
    ({"memory_format": "nhwc"}, "unknown memory format 'nhwc'; valid: contiguous, channels_last"),
]


@pytest.mark.parametrize("kwargs, message", BAD_SETTINGS, ids=[m for _, m in BAD_SETTINGS])
def test_bad_settings_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message.replace("*", r"\*")):
        bench.settings(**{"device": "cpu", **kwargs})


def test_cuda_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="CUDA is not available"):
        bench.settings(device="cuda")
    assert bench.settings(device="auto").device == "cpu"


# ---------------------------------------------------------------------------- the command


def test_cli_prints_the_table_and_writes_the_csv(tmp_path, small_machine_copy):
    out = tmp_path / "tmp" / "bench.csv"
    result = cli.invoke(
        app,
        ["bench", "--shape", "4,3,5,5", "--repeats", "2", "--warmup", "1", "--threads", "1"]
        + ["--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    for word in ("median", "vs torch", "%mem", "4x3x5x5", "torch", "reference", "cpu", "copy"):
        assert word in result.stdout
    assert str(out) in result.stdout
    written = pd.read_csv(out)
    assert list(written.columns) == list(bench.COLUMNS)
    assert list(written["impl"]) == ["torch", "reference", "cpu", "copy"]
    assert (written["machine_copy_bytes"] == MACHINE_BYTES).all()
    assert "2 x 1 MiB" in result.stdout  # the caption names the machine copy
    assert "triton left out" in result.stderr


BAD_ARGS = [
    (["--impl", "fast"], "unknown impl 'fast'"),
    (["--shape", "4,3,5"], "bad shape '4,3,5'"),
    (["--shape", "4,three,5,5"], "bad shape"),
    (["--dtype", "int8"], "unknown dtype"),
    (["--memory-format", "auto"], "unknown memory format 'auto'"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--device", "cpu", "--impl", "triton"], "cannot run here"),
]


@pytest.mark.parametrize("args, message", BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
def test_bad_input_exits_2_with_one_message_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "bench.csv"
    result = cli.invoke(app, ["bench", *args, "--out", str(out)])
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert not out.exists()


def test_cli_cuda_without_cuda(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "bench.csv"
    result = cli.invoke(app, ["bench", "--device", "cuda", "--out", str(out)])
    assert result.exit_code == 2 and "CUDA is not available" in result.stderr
    assert not out.exists()

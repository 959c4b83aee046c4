"""The kernel fuzz (tests/kernel_fuzz.py): normbench's BatchNorm against torch on random
arguments through every entry point, in subprocesses: on the compiled CPU kernel, on the
Triton kernels (interpreted), and on the CPU kernel built with AddressSanitizer, which fails
on any read or write outside a tensor.

A batch of cases runs in a process of its own, which reports each case as it finishes: a
crash (a segfault, ASan's report) ends the process, the case it was running is run again
alone (to confirm it and keep its own report) and named, and the rest of the batch goes on
in a new process. Seeded: ``NORMBENCH_FUZZ_SEED`` (default 0) and ``NORMBENCH_FUZZ_CASES``
choose the cases; every failure prints its seed, its case and the command that runs it again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from kernel_fuzz import draw

from normbench.kernels import cpu

FUZZ = Path(__file__).with_name("kernel_fuzz.py")
SEED = int(os.environ.get("NORMBENCH_FUZZ_SEED", "0"))
CASES = int(os.environ.get("NORMBENCH_FUZZ_CASES", "800"))
#: The Triton kernels run as Triton's interpreter here: slower, so fewer cases.
TRITON_CASES = max(1, CASES // 6)
#: Under AddressSanitizer every access is checked: fewer cases too. Half still catches the
#: per_channel overflow it was proven on (22 of 800 cases hit it: missing it in 400 has a
#: chance of about 1e-5).
ASAN_CASES = max(1, CASES // 2)
BATCH_TIMEOUT = 600  # seconds a process may take for its cases (a hang is a failure too)


@dataclass
class Report:
    """What a run of cases found: mismatches (reported by the worker) and crashes."""

    seed: int
    failures: list[dict] = field(default_factory=list)
    crashes: list[dict] = field(default_factory=list)
    ran: int = 0

    def describe(self, flags: list[str]) -> str:
        again = " ".join(["python tests/kernel_fuzz.py", *flags, "--seed", str(self.seed)])
        lines = [f"seed {self.seed}: {self.ran} cases ran"]
        for failure in self.failures:
            index = failure["index"]
            lines.append(f"case {index} ({failure['case']['api']}): {failure['detail']}")
            lines.append(f"  arguments: {json.dumps(failure['case'])}")
            lines.append(f"  again: {again} --first {index} --last {index} --show")
        for crash in self.crashes:
            index = crash["index"]
            lines.append(f"case {index} CRASHED (exit status {crash['returncode']})")
            lines.append(f"  arguments: {json.dumps(crash['case'])}")
            lines.append(f"  again: {again} --first {index} --last {index} --show")
            lines.append("  " + "\n  ".join(crash["stderr"]))
        return "\n".join(lines)


def _worker(flags, seed, first, last, env, timeout):
    """One process over cases [first, last]: its report lines, exit status and stderr (a
    hang counts as a crash of the case it was running)."""
    command = [sys.executable, str(FUZZ), *flags, "--seed", str(seed)]
    command += ["--first", str(first), "--last", str(last)]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        return done.stdout, done.returncode, done.stderr
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        return out, f"timed out after {timeout} s", ""


def run_cases(first, last, *, flags=(), env=None, seed=SEED, timeout=BATCH_TIMEOUT) -> Report:
    """Cases ``first`` to ``last`` of ``seed``, each batch in a subprocess, a crash named."""
    flags = list(flags)
    env = {**os.environ, **(env or {})}
    report = Report(seed)
    index = first
    while index <= last:
        out, status, err = _worker(flags, seed, index, last, env, timeout)
        running, finished = None, set()
        for line in out.splitlines():
            result = json.loads(line)
            if "fatal" in result:
                raise AssertionError(f"the fuzz worker could not start: {result['fatal']}")
            if "start" in result:
                running = result["start"]
                continue
            finished.add(result["index"])
            report.ran += 1
            if not result["ok"]:
                report.failures.append(result)
        if status == 0:
            break
        if running is None or running in finished:
            raise AssertionError(f"the fuzz worker failed outside a case ({status}):\n{err}")
        _, alone_status, alone_err = _worker(flags, seed, running, running, env, timeout)
        report.crashes.append(
            {
                "index": running,
                "returncode": alone_status if alone_status != 0 else status,
                "stderr": _crash_lines(alone_err or err),
                "case": draw(seed, running),
            }
        )
        report.ran += 1
        index = running + 1
    return report


def _crash_lines(stderr: str) -> list[str]:
    """What to show of a crashed process's stderr: ASan's report (what was read or written,
    where, and its summary line), else the last lines."""
    lines = stderr.strip().splitlines()
    start = next((i for i, line in enumerate(lines) if "ERROR: AddressSanitizer" in line), None)
    if start is None:
        return lines[-40:]
    summary = [line for line in lines if line.startswith("SUMMARY: AddressSanitizer")]
    return lines[start : start + 12] + summary


def assert_clean(report: Report, flags=()) -> None:
    assert not report.failures and not report.crashes, report.describe(list(flags))


# ------------------------------------------------------------------------------ the fuzz


def test_every_entry_point_matches_torch_or_fails_cleanly():
    """NORMBENCH_FUZZ_CASES cases (800 by default) on the compiled CPU kernel: torch's
    results where torch computes, torch's exception type where it refuses, no crash."""
    report = run_cases(0, CASES - 1)
    assert_clean(report)
    assert report.ran == CASES


def test_the_triton_kernels_match_torch_or_fail_cleanly():
    """The same cases on the Triton kernels (the operators' CPU implementations swapped for
    them, run by Triton's interpreter): their Python checks refuse what the C++ ones do."""
    flags = ["--triton"]
    report = run_cases(0, TRITON_CASES - 1, flags=flags, env={"TRITON_INTERPRET": "1"})
    assert_clean(report, flags)
    assert report.ran == TRITON_CASES


def test_a_crashing_case_is_named_and_the_others_still_run():
    """A case that kills its process (a real segfault, made by the worker for this test) is
    reported with its number and exit status, and the cases after it still run."""
    report = run_cases(0, 5, env={"NORMBENCH_FUZZ_CRASH": "3"})
    assert [crash["index"] for crash in report.crashes] == [3]
    assert report.crashes[0]["returncode"] == -11  # SIGSEGV
    assert report.ran == 6 and not report.failures
    assert "case 3 CRASHED (exit status -11)" in report.describe([])


# ------------------------------------------------------------------------------ AddressSanitizer


def _compiler_file(name: str) -> str:
    """The file of the compiler that builds the kernel (torch's: $CXX, else c++)."""
    compiler = os.environ.get("CXX", "c++")
    found = subprocess.run(
        [compiler, f"-print-file-name={name}"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert os.path.isabs(found), f"{compiler} has no {name}: AddressSanitizer's runtime"
    return found


def asan_environment() -> dict[str, str]:
    """A Python process that loads the kernel built with AddressSanitizer: ASan's runtime
    preloaded first (Python itself is not built with it), and libstdc++ with it (ASan's
    interceptor of C++ exceptions needs it at start), leak checks off (Python's own)."""
    preload = f"{_compiler_file('libasan.so')} {_compiler_file('libstdc++.so')}"
    return {
        "LD_PRELOAD": preload,
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0",
        cpu.SANITIZE_ENV: "address",
        "NORMBENCH_KERNEL_CACHE": str(cpu.cache_root()),
    }


@pytest.fixture(scope="module")
def asan_build():
    """The kernel built with AddressSanitizer, started with the module so that its compile
    (about a minute and a half on one core) runs beside the other fuzz tests."""
    env = {**os.environ, **asan_environment()}
    started = subprocess.Popen(
        [sys.executable, "-c", "from normbench.kernels import cpu, ops\n"
         "assert ops.library() is not None, cpu.failure()"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    yield started
    started.kill()
    started.communicate()


def test_no_case_reads_or_writes_outside_a_tensor_under_address_sanitizer(asan_build):
    """The fuzz cases on the kernel built with ``-fsanitize=address``: any read or write
    out of a tensor's bounds (as per_channel's stride(0) read of a (1, C) weight did) stops
    the process with ASan's report, which fails this test with the case named."""
    out, err = asan_build.communicate(timeout=900)
    assert asan_build.returncode == 0, f"the ASan build failed:\n{out}\n{err}"
    report = run_cases(0, ASAN_CASES - 1, env=asan_environment())
    assert_clean(report)
    assert report.ran == ASAN_CASES


def test_the_address_sanitizer_build_is_a_build_of_its_own(monkeypatch):
    """NORMBENCH_KERNEL_SANITIZE=address adds ASan's flags, so its build has its own cache
    entry; an unknown sanitizer is refused."""
    plain = cpu.extension_name()
    monkeypatch.setenv(cpu.SANITIZE_ENV, "address")
    assert "-fsanitize=address" in cpu.cflags() and "-fsanitize=address" in cpu.ldflags()
    assert cpu.extension_name() != plain
    monkeypatch.setenv(cpu.SANITIZE_ENV, "thread")
    with pytest.raises(ValueError, match="NORMBENCH_KERNEL_SANITIZE='thread': valid are"):
        cpu.cflags()

"""Process groups, synchronized BatchNorm's reductions and data-parallel runs' processes,
on torch.distributed.

One run on many processes uses torch.distributed (gloo on the CPU, NCCL on CUDA). This
module holds what the layers and the training loop need from it, and the start of a
run's processes (below, "data-parallel runs"):

- :func:`world_size` and :func:`sync_group`: the group a synchronized BatchNorm reduces
  over. ``group_size`` k makes groups of k consecutive ranks (k = 1: each process alone,
  local BatchNorm; k = the world size, or None: every process); a k that does not divide
  the world size is refused with one :class:`~normbench.errors.UserError` line.
- :func:`reduce_sum`: synchronized BatchNorm's reductions, one ``all_reduce`` each, twice
  a step. In the forward each process writes its ``(count, mean, M2)`` into its own row of
  a zeroed ``(k, 1 + 2C)`` float64 table, and the sum over the group is every row at once,
  exact (adding zeros rounds nothing); every process then merges the rows in the same
  order by the parallel-variance formula (Chan, Golub & LeVeque; the kernel's
  ``batch_norm_merge_stats``, one call), so the merged statistics, and the running
  statistics made from them, are the same bits on every rank, and a large mean against
  the spread costs no precision (a sum of squares would lose it: ``E[x^2] - E[x]^2``). The
  table is k times a sum's size; at BatchNorm's sizes (C values per layer) that is a few
  KiB, and torch's SyncBatchNorm exchanges as much (an ``all_gather`` of every rank's mean
  and invstd). In the backward, the two per-channel sums, in float64.
- :func:`finish`: the wait for a collective, spinning briefly on the CPU (a data-parallel
  step's, in :mod:`normbench.ddp`, and synchronized BatchNorm's).

torch is imported inside the functions (the package's commands that never train import
none of it).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

from normbench import interrupts
from normbench.errors import UserError

__all__ = [
    "SyncGroup",
    "check_group_size",
    "check_nodes",
    "check_parallel",
    "reduce_sum",
    "sync_group",
    "sync_ranks",
    "world_size",
]


def world_size() -> int:
    """The number of processes of the default process group; 1 where there is none."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size()


def check_group_size(group_size: int | None, size: int) -> int:
    """The number of processes one group synchronizes: ``group_size``, or ``size`` (all) for
    None. A UserError where it does not divide the ``size`` processes into whole groups."""
    if group_size is None:
        return size
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise UserError(f"norm.group_size must be a whole number of at least 1, got {group_size!r}")
    if size % group_size:
        raise UserError(
            f"norm.group_size={group_size} does not divide the {size} "
            f"process{'es' if size != 1 else ''} into whole groups; use a divisor of {size}"
        )
    return group_size


def check_parallel(cfg, device: str) -> None:
    """A run's data-parallel and precision settings, checked before anything is written
    (one :class:`UserError` line each): the global ``batch_size`` must split evenly over
    ``processes x nodes``, sync_bn's ``norm.group_size`` must divide that world size, and
    fp16 needs CUDA (``device``: the device the run resolves to). ``nodes > 1`` is checked
    where it is known how the run starts (:func:`check_nodes`)."""
    world = cfg.processes * cfg.nodes
    if cfg.batch_size % world:
        raise UserError(
            f"batch_size={cfg.batch_size} does not split over {world} processes "
            f"(processes={cfg.processes} x nodes={cfg.nodes}): batch_size is the global "
            f"batch; use a multiple of {world}"
        )
    # sync_bn's key alone: a user's norm may mean something else by a group_size (its class,
    # where it synchronizes too, is checked once built: NormSpec.local_batch)
    synced = hasattr(cfg.norm, "get") and cfg.norm.get("name") == "sync_bn"
    group_size = cfg.norm.get("group_size") if synced else None
    if group_size is not None:  # one process too: group_size=2 would record a batch never seen
        try:
            check_group_size(group_size, world)
        except UserError as err:  # which job of a sweep: its processes and nodes
            raise UserError(f"{err} (processes={cfg.processes} x nodes={cfg.nodes})") from None
    if str(cfg.precision) == "fp16" and device != "cuda":
        raise UserError(
            "precision=fp16 needs CUDA (float16 training takes a gradient scaler on a GPU); "
            "on the CPU use precision=bf16"
        )


def check_nodes(nodes: int, slurm: bool) -> None:
    """A run on several nodes starts only as a SLURM job's tasks (``slurm``: it does, or
    the sweep's launcher submits it so); elsewhere a UserError line."""
    if nodes > 1 and not slurm:
        raise UserError(
            f"nodes={nodes}: a run on several nodes starts only on SLURM (normbench sweep "
            "hydra/launcher=submitit_slurm, one task per process); on one machine use "
            "processes=P"
        )


def sync_ranks(group_size: int | None, size: int) -> list[list[int]]:
    """The groups of ``group_size`` consecutive ranks of ``size`` processes (checked)."""
    k = check_group_size(group_size, size)
    return [list(range(start, start + k)) for start in range(0, size, k)]


class SyncGroup:
    """The processes one layer synchronizes with: ``group`` (a process group; None for the
    default one), this process's ``index`` in it (its row in the statistics'
    table: :func:`reduce_sum`) and its ``size``."""

    __slots__ = ("group", "index", "size")

    def __init__(self, group: Any, index: int, size: int) -> None:
        self.group, self.index, self.size = group, index, size

    def __repr__(self) -> str:
        return f"SyncGroup(index={self.index}, size={self.size})"


# Process groups made for a group size, by (default group, group size): new_group is a
# collective over every process, so each is made once and by all, in the same order (a
# new default group, after another init in the same process, makes its own).
_groups: dict[tuple[Any, int], SyncGroup | None] = {}

# The timeout :func:`join` gave the default group: the groups made from it wait as long
# (new_group's own default is torch's, 30 minutes on gloo). None: a group joined
# elsewhere (a user's own init_process_group), whose groups take torch's default.
_timeout: Any = None


def sync_group(group_size: int | None = None, process_group: Any = None) -> SyncGroup | None:
    """The group this process synchronizes with; None where it synchronizes with nobody
    (no process group initialized, one process, a group of one): then a synchronized
    BatchNorm is local BatchNorm.

    ``process_group`` (torch.nn.SyncBatchNorm's argument) is used as it is; else the
    default group split into groups of ``group_size`` consecutive ranks (None: one group
    of every process). Every process must ask for the same group sizes in the same order
    (as every process builds the same model)."""
    import torch.distributed as dist

    if _local_only or not dist.is_available() or not dist.is_initialized():
        return None
    if process_group is not None:
        size = dist.get_world_size(process_group)
        index = dist.get_rank(process_group)
        return SyncGroup(process_group, index, size) if size > 1 else None
    size = dist.get_world_size()
    k = check_group_size(group_size, size)
    if k == 1:
        return None
    rank = dist.get_rank()
    if k == size:
        return SyncGroup(None, rank, size)
    key = (dist.group.WORLD, k)
    if key not in _groups:
        mine = None
        for ranks in sync_ranks(k, size):
            # every rank makes every group (a collective)
            group = dist.new_group(ranks, timeout=_timeout)
            if rank in ranks:
                mine = SyncGroup(group, ranks.index(rank), k)
        _groups[key] = mine
    return _groups[key]


def reduce_sum(values: Any, sync: SyncGroup) -> None:
    """``values`` (float64) added up over the group in place, with one ``all_reduce``:
    synchronized BatchNorm's two reductions a step (``batch_norm_synced``'s
    ``all_reduce``). The forward's is a ``(k, 1 + 2C)`` table of every process's count,
    mean and M2, each in its own row and zeros elsewhere, so the sum is every row at once,
    exact (adding zeros rounds nothing); the backward's, its two per-channel sums (plain
    sums around the group's mean: no cancellation)."""
    import torch.distributed as dist

    work = dist.all_reduce(values, group=sync.group, async_op=True)
    finish(work, values.device.type == "cpu")


#: How long a process waiting for a collective on the CPU keeps its core, yielding it
#: between looks, before it sleeps (:func:`finish`).
SPIN_S = 0.01


def finish(work: Any, spin: bool) -> None:
    """Wait for ``work``, a collective started with ``async_op=True``; raise what it
    raised (a lost peer, the process group's timeout). With ``spin`` (gloo, on the CPU)
    the first :data:`SPIN_S` of the wait yield the core in a loop instead of sleeping:
    a sleeping process is woken by the other's data through gloo's threads, and on a
    virtual machine whose idle core has halted that wake-up was most of a data-parallel
    step's wait (benchmarks/README.md). Longer waits (a slow or lost peer) sleep as before."""
    if spin:
        deadline = time.perf_counter() + SPIN_S
        while not work.is_completed() and time.perf_counter() < deadline:
            os.sched_yield()
    work.wait()


# ------------------------------------------------------------------ data-parallel runs
#
# A run on P processes (``processes``): the launching process keeps the run's lock and
# starts P workers with torch's elastic launcher; each joins the process group (gloo on
# the CPU, NCCL on CUDA), trains a DistributedDataParallel copy of the model on its slice
# of every global batch, and rank 0 alone writes the run folder.

#: The exit status of a rank that stopped because another did (a collective failed: a
#: peer died or hung past the process group's timeout); the launcher names the others.
PEER_LOST = 75

# Set by :func:`local`: synchronized BatchNorm normalizes this process's batch alone.
_local_only = False


class Rank:
    """This process's place in a data-parallel run: ``rank`` of ``world`` processes,
    ``local_rank`` on its node (its GPU)."""

    __slots__ = ("local_rank", "rank", "world")

    def __init__(self, rank: int, world: int, local_rank: int) -> None:
        self.rank, self.world, self.local_rank = rank, world, local_rank

    def __repr__(self) -> str:
        return f"Rank({self.rank} of {self.world}, local {self.local_rank})"

    def share(self, count: int) -> slice:
        """This rank's contiguous part of ``count`` items: equal parts, the first
        ``count % world`` ranks one more (a global batch divides evenly)."""
        base, extra = divmod(count, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))


def join(device: str, timeout_s: float, store: Any = None) -> Rank:
    """Join the process group of the run this process is a worker of (the launcher's
    environment: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; ``store``: the
    rendezvous store, where not the one that environment names); NCCL with this
    process's GPU on CUDA, gloo on the CPU. A collective waits at most ``timeout_s``."""
    import datetime

    import torch
    import torch.distributed as dist

    rank = Rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), 0)
    rank.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(rank.local_rank)
    global _timeout
    backend, timeout = "nccl" if device == "cuda" else "gloo", datetime.timedelta(seconds=timeout_s)
    _timeout = timeout
    if store is None:
        dist.init_process_group(backend, timeout=timeout)
    else:
        dist.init_process_group(
            backend, store=store, rank=rank.rank, world_size=rank.world, timeout=timeout
        )
    return rank


def leave() -> None:
    """Leave the process group (where one was joined)."""
    import torch.distributed as dist

    global _timeout
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _groups.clear()
    _timeout = None


class local:  # noqa: N801 - a context, used as ``with distributed.local():``
    """Inside it, synchronized BatchNorm synchronizes with nobody: rank 0 measuring the
    model alone (PreciseBN, per-layer diagnostics) calls no collective the others would
    have to join."""

    def __enter__(self) -> None:
        global _local_only
        self.before, _local_only = _local_only, True

    def __exit__(self, *exc) -> None:
        global _local_only
        _local_only = self.before


def lost_peer(err: BaseException) -> bool:
    """Whether ``err`` is a collective that failed because another process did (closed
    its connection, or let the process group's timeout pass)."""
    import torch.distributed as dist

    kinds = tuple(
        getattr(dist, name) for name in ("DistError", "DistBackendError") if hasattr(dist, name)
    )
    if isinstance(err, kinds):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        word in text for word in ("Connection closed by peer", "Connection reset", "Gloo", "gloo",
                                  "NCCL", "Timed out", "timed out", "Socket Timeout")
    )  # fmt: skip


def free_port() -> int:
    """A TCP port on 127.0.0.1 free now (for the rendezvous of a local run)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RanksFailed(Exception):
    """One or more of a run's processes ended with an error, a signal or an exit status;
    ``reason`` names them (the ranks that stopped only because another did are left out
    where another is named)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


#: How the workers of a local run start: forked from multiprocessing's fork server, a
#: clean process (no threads, no CUDA, none of the launcher's files or locks) that
#: :func:`prestart` sets importing what every worker needs while the launching process
#: checks and builds the run. A spawned worker would import all of it anew, after the
#: launch, each on its own.
START_METHOD = "forkserver"


#: What every worker of a data-parallel run imports before its first step (the fork
#: server imports it once: :func:`prestart`); "__main__" is the launching program, which
#: multiprocessing imports in each worker otherwise. Torch imports its compiler's
#: modules (torch._dynamo) with the first optimizer built, hence that one.
WORKER_MODULES = [
    "__main__",
    "torch",
    "torch._dynamo",
    "torch.distributed",
    "torch.nn.parallel",
    "torch.distributed.elastic.multiprocessing.api",
    "normbench.runner",
    "normbench.build",
    "normbench.train",
    "normbench.models",
    "normbench.norms",
    "normbench.kernels.ops",
    "normbench.checkpoints",
    "normbench.trackers",
    "normbench.diagnostics",
    "normbench.inference",
    "normbench.preloaded",  # last: freezes the collector over the modules above
]


def shareable(data: Any) -> bool:
    """Whether the launcher's data set (a ``DataSplits`` on the CPU) goes to the workers
    rather than each loading its own (decoding files, importing their readers): its
    tensors go through shared memory, copied there once, where /dev/shm has room for
    twice its size (a container's default is small)."""
    size = sum(
        t.numel() * t.element_size() for t in vars(data).values() if hasattr(t, "element_size")
    )
    try:
        shm = os.statvfs("/dev/shm")
    except OSError:
        return False
    return 2 * size < shm.f_bavail * shm.f_frsize


def relay(events: Any, display: Any) -> None:
    """Rank 0's progress reports (:class:`Forward`), passed on to the launcher's display
    until None comes."""
    while (event := events.get()) is not None:
        if display is not None:
            name, args = event
            getattr(display, name)(*args)


class Forward:
    """Rank 0's display: each report goes to the launching process (:func:`relay`)."""

    def __init__(self, events: Any) -> None:
        self.events = events

    def on_start(self, *args) -> None:
        self.events.put(("on_start", args))

    def on_step(self, *args) -> None:
        self.events.put(("on_step", args))

    def on_epoch(self, *args) -> None:
        self.events.put(("on_epoch", args))


def prestart(modules: list[str]) -> None:
    """Start the fork server of :func:`launch`'s workers now, importing ``modules``
    (module names), so that this is done by the time the workers are wanted. The server
    serves every later launch of this process, and ends with it."""
    import multiprocessing
    import signal
    import threading
    from multiprocessing import forkserver, resource_tracker

    global _server_env
    multiprocessing.get_context(START_METHOD).set_forkserver_preload(list(modules))
    before = forkserver._forkserver._forkserver_pid
    # Ctrl-C at a terminal goes to its whole process group: the server, importing torch,
    # and a worker, before its run began, each printed a KeyboardInterrupt traceback.
    # Started with SIGINT ignored, they keep ignoring it (an ignored signal stays so
    # across exec, Python leaves it so, and the server's workers inherit it; so does
    # interrupts.handle_signals): the launching process alone takes it, and its elastic
    # agent stops the workers (SIGTERM), which then record the run.
    # multiprocessing's resource tracker (the server's and the launcher's queue register
    # their semaphores there) ignores SIGINT and SIGTERM, but a terminal's SIGHUP ended it,
    # and the tracker started anew printed a KeyError traceback for each semaphore it
    # had not seen: it starts ignoring SIGHUP too (not so the server, whose workers must
    # take SIGHUP). It ends when the launching process does.
    if threading.current_thread() is threading.main_thread():
        with _ignoring(signal.SIGINT, signal.SIGHUP):
            resource_tracker.ensure_running()
        with _ignoring(signal.SIGINT):
            forkserver.ensure_running()
    else:
        forkserver.ensure_running()
    # The environment the server started with, which its workers inherit: taken again when
    # it starts anew (a stopped run stops it), else a later worker took the variables of
    # the run that restarted it for its agent's, and kept them (take_environment).
    if _server_env is None or forkserver._forkserver._forkserver_pid != before:
        _server_env = dict(os.environ)


@contextlib.contextmanager
def _ignoring(*signums: int):
    """The signals ``signums`` ignored while inside (the main thread only): what this
    process starts meanwhile starts ignoring them. Blocked too, first, in this thread: one
    that comes meanwhile waits (Linux keeps a blocked signal pending though it is ignored),
    and this process's own handler takes it as the block is lifted. Ignored alone, a Ctrl-C
    in those milliseconds was lost, and the run went on to its end. Not where another
    thread of the process (a progress display's) does not block it: the kernel hands it
    that thread, which drops it while it is ignored, so a Ctrl-C in those milliseconds can
    still be lost there. What starts meanwhile starts with them blocked as well as ignored,
    which is the same to it."""
    import signal

    held = signal.pthread_sigmask(signal.SIG_BLOCK, signums)
    before = {signum: signal.signal(signum, signal.SIG_IGN) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in before.items():
            # None: a handler installed from C, which Python cannot put back
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def stop_server() -> None:
    """End the fork server :func:`prestart` started, now (nothing where none runs). It
    ignores SIGINT: a run stopped before its workers were launched left it importing
    torch, seconds of a core, after the launching process had gone."""
    import signal
    from multiprocessing import forkserver

    server = forkserver._forkserver  # the module's one server; it has no public stop
    pid = getattr(server, "_forkserver_pid", None)
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(OSError):
        server._stop()  # reaps it and forgets it: a later prestart starts another


# The environment the fork server started with, which its workers inherit.
_server_env: dict[str, str] | None = None


def worker_environment() -> dict[str, dict[str, str]]:
    """What a worker needs to run in this process's environment as it is now, not as it
    was when the fork server started (:func:`take_environment`)."""
    return {
        "now": dict(os.environ),
        "server": dict(_server_env or os.environ),
        # which the workers watch: the pid and start time name this process, not one that
        # is given its pid once it is gone
        "launcher": {"pid": str(os.getpid()), "start": interrupts.start_time(os.getpid()) or ""},
    }


def take_environment(env: dict[str, dict[str, str]] | None) -> None:
    """In a worker: the launcher's environment (``env`` from :func:`worker_environment`),
    and over it what the elastic agent set for this worker (its rank, the rendezvous)."""
    if env is None:
        return
    agent = {k: v for k, v in os.environ.items() if env["server"].get(k) != v}
    os.environ.clear()
    os.environ.update(env["now"])
    os.environ.update(agent)


#: Seconds a process that lost its peers waits before it exits: the launcher names the
#: first process it sees end, and the one that failed first is the cause.
PEER_LOST_WAIT_S = 1.0


def peer_lost() -> None:
    """End this worker because another did (:data:`PEER_LOST`), after
    :data:`PEER_LOST_WAIT_S` (the launcher stops it sooner once it has seen the other)."""
    import time

    time.sleep(PEER_LOST_WAIT_S)
    raise SystemExit(PEER_LOST)


def context() -> Any:
    """The multiprocessing context of the workers (for what the launcher hands them)."""
    import multiprocessing

    return multiprocessing.get_context(START_METHOD)


def launch(entry: Any, args: tuple, processes: int, run_id: str) -> None:
    """Run ``entry(*args)`` in ``processes`` workers on this machine with torch's elastic
    launcher (rendezvous on 127.0.0.1 at a free port, no restarts: a failed run is
    resumed by the next ``normbench run``, from its checkpoint; workers started as
    :data:`START_METHOD` says). Returns when every worker has returned;
    :class:`RanksFailed` when one failed (the others are stopped: SIGTERM, then SIGKILL
    after a grace period, so none outlives the launch)."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # the agent's own log lines (each rank's start, its failures, its stopping of the
    # rest: "Received 2 death signal, shutting down workers") would only repeat, in its
    # format, what the run records and the CLI says (its tracebacks of the rank that
    # failed too: the run's error names it, in a line; and torch.multiprocessing's warning
    # that it stops the others). Each of its modules' loggers sets a level of its own
    # (torch's get_logger), which a parent's does not override: each is quieted.
    for name in [*logging.root.manager.loggerDict, "torch.distributed.elastic"]:
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    logging.getLogger("torch.multiprocessing").setLevel(logging.ERROR)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=processes,
        run_id=f"normbench-{run_id}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        max_restarts=0,
        monitor_interval=0.1,
        start_method=START_METHOD,
        shutdown_timeout=10,
    )
    from normbench import interrupts

    # No signal is handed to the agent (an empty list: it finds no signal by that name,
    # which it logs, quietly here). It would stop the workers with the signal it got: with
    # SIGINT, which they ignore (prestart), it waited out its shutdown timeout and killed
    # them before rank 0 recorded the run; and a second signal during that shutdown cut
    # it short. Here the stop signals raise in this thread (interrupts.handle_signals;
    # a second one is ignored), and the agent, on its way out, stops the workers with
    # SIGTERM and waits for them: rank 0 records the run.
    config.signals_to_handle = ""
    try:
        with interrupts.handle_signals(), _stdlib_start_method():
            elastic_launch(config, entry)(*args)
    except ChildFailedError as err:
        raise RanksFailed(failure_reason(err.failures)) from None


@contextlib.contextmanager
def _stdlib_start_method():
    """multiprocessing's default start method one of its own while workers start: each
    worker sets the launching process's default as its own before it runs a line (the
    preparation data multiprocessing sends it), and a method another library registered
    (joblib's ``loky``, in a sweep's job under hydra/launcher=joblib) is unknown there:
    every worker failed with "cannot find context for 'loky'"."""
    import multiprocessing

    method = multiprocessing.get_start_method(allow_none=True)
    if method is None or method in multiprocessing.get_all_start_methods():
        yield
        return
    multiprocessing.set_start_method(START_METHOD, force=True)
    try:
        yield
    finally:
        multiprocessing.set_start_method(method, force=True)


def failure_reason(failures: dict[int, Any]) -> str:
    """Which ranks failed and how (exit status or signal), the cause first: ranks that
    stopped because a peer did (:data:`PEER_LOST`) are named only when nothing else is."""
    import signal

    def how(failure) -> str:
        code = failure.exitcode
        if code is not None and code < 0:
            try:
                return f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        if code == PEER_LOST:
            return "lost its peers (a collective failed or timed out)"
        if code is not None and 128 < code < 128 + signal.NSIG:  # a signal it recorded itself
            with contextlib.suppress(ValueError):
                return f"was stopped by {signal.Signals(code - 128).name}"
        return f"exited with status {code}"

    causes = {r: f for r, f in failures.items() if f.exitcode != PEER_LOST} or failures
    return "; ".join(f"rank {r} {how(f)}" for r, f in sorted(causes.items()))


# ------------------------------------------------------------------ SLURM's tasks
#
# On SLURM a data-parallel run is one job of processes x nodes tasks (srun starts them:
# the sweep's launcher sets tasks_per_node and nodes), each task one rank. Nothing is
# launched here: each task reads its place from SLURM's environment and joins the
# process group at an address and port every task derives alike.

#: The TCP ports of the rendezvous of SLURM runs: ``PORT_BASE + job id % PORT_SPAN``, so
#: that every task of a job finds the same one without asking, and two jobs on one node
#: collide only when their ids are PORT_SPAN apart.
PORT_BASE = 15000
PORT_SPAN = 10000


def slurm_task(world: int) -> Rank | None:
    """This process as one of the ``world`` tasks of a SLURM job step that runs a run's
    processes (rank ``SLURM_PROCID`` of ``SLURM_NTASKS``, local rank ``SLURM_LOCALID``);
    None where it is not one (no step, or a step of one task: a run's processes are then
    started here). A UserError line when the step's tasks are not the run's processes."""
    env = os.environ
    if "SLURM_STEP_ID" not in env or "SLURM_PROCID" not in env:
        return None
    tasks = int(env.get("SLURM_NTASKS") or env.get("SLURM_STEP_NUM_TASKS") or 1)
    if tasks <= 1:
        return None
    if tasks != world:
        raise UserError(
            f"this SLURM job step has {tasks} tasks, but the run has {world} "
            f"process{'es' if world != 1 else ''} "
            "(processes x nodes): a data-parallel run on SLURM is one task per process"
        )
    return Rank(int(env["SLURM_PROCID"]), tasks, int(env.get("SLURM_LOCALID") or 0))


def rendezvous() -> tuple[str, int]:
    """Where the tasks of this SLURM job meet: the first host of ``SLURM_JOB_NODELIST``
    (``scontrol show hostnames``; rank 0 runs there) and a port from the job's id."""
    import subprocess

    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    host = "127.0.0.1"
    if nodelist:
        listed = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True
        )
        names = listed.stdout.split() if listed.returncode == 0 else []
        # (a node list scontrol cannot expand, or no scontrol: a list of one host as it is)
        host = names[0] if names else nodelist.split(",")[0]
    job = int(os.environ.get("SLURM_JOB_ID", "0"))
    return host, PORT_BASE + job % PORT_SPAN


def join_task(rank: Rank, device: str, timeout_s: float) -> Rank:
    """Join the process group of the run this SLURM task is ``rank`` of (:func:`join`;
    the environment torch's ``env://`` reads is set here from SLURM's). Rank 0 serves the
    rendezvous store at :func:`rendezvous`'s port; every key is the job's own (a
    ``PrefixStore`` named for the job), so that the tasks of another job that finds the
    same port (its id :data:`PORT_SPAN` apart) wait for their own rank 0 and time out,
    rather than joining this job's run as its ranks. A port already taken fails rank 0
    with one line that says so."""
    import datetime

    import torch.distributed as dist

    host, port = rendezvous()
    job = os.environ.get("SLURM_JOB_ID", "0")
    os.environ.update(
        RANK=str(rank.rank),
        WORLD_SIZE=str(rank.world),
        LOCAL_RANK=str(rank.local_rank),
        MASTER_ADDR=host,
        MASTER_PORT=str(port),
    )
    try:
        store = dist.TCPStore(
            host,
            port,
            rank.world,
            is_master=rank.rank == 0,
            timeout=datetime.timedelta(seconds=timeout_s),
            wait_for_workers=False,  # (the process group's own barrier waits for them)
        )
    except RuntimeError as err:
        if rank.rank != 0 or "EADDRINUSE" not in str(err):
            raise
        raise RuntimeError(
            f"the rendezvous port {port} on {host} of SLURM job {job} is taken (by another "
            f"program, or a job whose id is a multiple of {PORT_SPAN} away)"
        ) from None
    return join(device, timeout_s, store=dist.PrefixStore(f"normbench/slurm-job-{job}/", store))


def tell(decision: Any) -> None:
    """Rank 0: send ``decision`` (a picklable value) to every other rank (:func:`hear`)."""
    import torch.distributed as dist

    dist.broadcast_object_list([decision], src=0)


def hear() -> Any:
    r"""Another rank: what rank 0 :func:`tell`\ s."""
    import torch.distributed as dist

    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0)
    return box[0]

"""normbench.distributed, sync_bn and normbench.ddp's training step on real processes: two
CPU processes with gloo.

One start of two processes (this file run as a script, ``--rank``) runs every check that
needs them and saves its results; the tests compare them, in this process, with
independent references: normbench's custom_bn and ghost_bn over the whole batch in one
process, and torch's SyncBatchNorm algorithm written out in float64 (torch's own
``nn.SyncBatchNorm`` refuses CPU tensors, and its operators have no CPU kernels, so the
workers run its math instead: all_gather of mean, invstd and count, its combination and its
backward; where a torch runs it on the CPU, the workers run torch's module too).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch_contract import TORCH_TAKES_BIAS

from normbench.errors import UserError

WORLD = 2
C = 3
BATCH = 8  # the global batch; each process gets BATCH / WORLD (or SPLIT's uneven parts)
SPLIT = (3, 5)  # the uneven case: per-rank samples
STEPS = 2
TOL = 1e-10

# name -> (module kwargs, per-rank split, channels_last)
CASES = {
    "global": ({}, None, False),
    "relu": ({"relu": True}, None, False),
    "channels_last": ({}, None, True),
    "cumulative": ({"momentum": None}, None, False),
    "reference": ({"backend": "reference"}, None, False),
    "uneven": ({}, SPLIT, False),
    "group_of_2": ({"group_size": 2}, None, False),
    "local": ({"group_size": 1}, None, False),
    "no_affine": ({"affine": False}, None, False),
    # norm, ReLU and 2x2 max-pooling: composed when synchronized, fused over the whole batch
    "pooled": ({"relu": True, "pool": True}, None, True),
}


def _data(step: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, C, 5, 5, generator=g, dtype=torch.float64) * 3 + 7
    dy = torch.randn(BATCH, C, 5, 5, generator=g, dtype=torch.float64)
    return x.to(dtype), dy.to(dtype)


def _params(dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(C, generator=g, dtype=dtype), torch.randn(C, generator=g, dtype=dtype)


def _bounds(rank: int, split) -> tuple[int, int]:
    sizes = split or (BATCH // WORLD,) * WORLD
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def _steps(layer, rank: int, split, channels_last: bool, dtype=torch.float64) -> dict:
    """``STEPS`` training steps of ``layer`` on this rank's part: outputs and gradients per
    step, the running statistics after."""
    out: dict = {"y": [], "dx": [], "dw": [], "db": []}
    lo, hi = _bounds(rank, split)
    for step in range(STEPS):
        x, dy = _data(step, dtype)
        x, dy = x[lo:hi].clone(), dy[lo:hi]
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        x.requires_grad_(True)
        if layer.weight is not None:
            layer.weight.grad = layer.bias.grad = None
        y = layer(x)
        (y * dy[..., : y.shape[2], : y.shape[3]]).sum().backward()  # (pooled: its corner)
        out["y"].append(y.detach())
        out["dx"].append(x.grad)
        if layer.weight is not None:
            out["dw"].append(layer.weight.grad.clone())
            out["db"].append(layer.bias.grad.clone())
    out["state"] = {k: v.clone() for k, v in layer.state_dict().items()}
    return out


def _torch_sync_math(x, w, b, running_mean, running_var, momentum, eps, dy) -> dict:
    """torch.nn.SyncBatchNorm's training step (torch/nn/modules/_functions.py) in plain float64
    operations: all_gather of each rank's (mean, invstd, count), torch's combination of them,
    the running statistics' update (unbiased by the whole count), then its backward: sum_dy and
    sum_dy_xmu all_reduced, the local weight and bias gradients."""
    import torch.distributed as dist

    dims = [0, *range(2, x.dim())]
    n = x.numel() // x.shape[1]
    mean = x.mean(dims)
    invstd = ((x - mean.view(1, -1, 1, 1)).square().mean(dims) + eps).rsqrt()
    combined = torch.cat([mean, invstd, torch.tensor([float(n)], dtype=x.dtype)])
    parts = [torch.empty_like(combined) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, combined)
    table = torch.stack(parts)
    means, invstds, counts = table[:, :C], table[:, C : 2 * C], table[:, 2 * C :]
    # batch_norm_gather_stats_with_counts: Welford's merge of (count, mean, var) in turn
    total = torch.zeros(1, dtype=x.dtype)
    g_mean = torch.zeros(C, dtype=x.dtype)
    g_m2 = torch.zeros(C, dtype=x.dtype)
    for i in range(table.shape[0]):
        ni, mi = counts[i], means[i]
        m2i = (invstds[i].pow(-2) - eps) * ni
        delta = mi - g_mean
        new_total = total + ni
        g_mean = g_mean + delta * ni / new_total
        g_m2 = g_m2 + m2i + delta.square() * total * ni / new_total
        total = new_total
    var = g_m2 / total
    g_invstd = (var + eps).rsqrt()
    running_mean.mul_(1 - momentum).add_(momentum * g_mean)
    running_var.mul_(1 - momentum).add_(momentum * var * total / (total - 1))
    shape = (1, -1, 1, 1)
    xhat = (x - g_mean.view(shape)) * g_invstd.view(shape)
    y = xhat * w.view(shape) + b.view(shape)
    sum_dy = dy.sum(dims)
    sum_dy_xmu = (dy * (x - g_mean.view(shape))).sum(dims)
    both = torch.cat([sum_dy, sum_dy_xmu])
    dist.all_reduce(both)
    mean_dy, mean_dy_xmu = both[:C] / total, both[C:] / total
    dx = (
        (dy - mean_dy.view(shape) - (x - g_mean.view(shape)) * g_invstd.view(shape).square()
         * mean_dy_xmu.view(shape))
        * g_invstd.view(shape) * w.view(shape)
    )  # fmt: skip
    return {
        "y": y, "dx": dx, "dw": sum_dy_xmu * g_invstd, "db": sum_dy,
        "running_mean": running_mean, "running_var": running_var,
    }  # fmt: skip


DDP_STEPS = 4
DDP_NORMS = ("custom_bn", "batch_renorm")  # local BatchNorm; one whose forward reads buffers


def _ddp_model(norm: str):
    from normbench.norms import NormSpec

    torch.manual_seed(3)
    # Batch Renorm's corrections from the first step: its forward reads its buffers
    spec = NormSpec(norm, {"warmup_steps": 0, "ramp_steps": 1} if norm == "batch_renorm" else {})
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), spec.build(4), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(4 * 4 * 4, 5),
    )  # fmt: skip


def _ddp_steps(rank: int, norm: str) -> dict:
    """``DDP_STEPS`` SGD steps of a small float32 model, on this rank's 3 images of 6, two
    ways: normbench's wrap (its gradient reduction carrying the loss and rank 0's buffers)
    and torch's DistributedDataParallel as it comes (buffers broadcast before each forward,
    the loss all_reduced on its own). Per step: this rank's loss, the parameters and
    buffers after it; normbench's global loss; then a step whose rank 1 images are NaN."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from normbench import ddp

    out: dict = {}
    for way in ("normbench", "torch"):
        model = _ddp_model(norm)
        if way == "normbench":
            net, reduction = ddp.wrap(model, "cpu")
        else:
            net, reduction = DistributedDataParallel(model), None
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        record: dict = {"loss": [], "total": [], "params": [], "buffers": []}
        for step in range(DDP_STEPS + 1):
            g = torch.Generator().manual_seed(50 + step)
            x = torch.randn(6, 1, 6, 6, generator=g) * 2 + 1
            y = torch.randint(0, 5, (6,), generator=g)
            x, y = x[3 * rank : 3 * rank + 3], y[3 * rank : 3 * rank + 3]
            if step == DDP_STEPS and rank == 1:
                x = torch.full_like(x, float("nan"))
            loss = F.cross_entropy(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            if reduction is not None:
                reduction.loss = loss.detach() * len(y)
            loss.backward()
            if reduction is not None:
                record["total"].append(reduction.finish())
            else:
                both = torch.tensor([loss.item() * len(y)], dtype=torch.float64)
                dist.all_reduce(both)
                record["total"].append(both.item())
            if step == DDP_STEPS:
                break
            optimizer.step()
            record["loss"].append(loss.item())
            record["params"].append([p.detach().clone() for p in model.parameters()])
            record["buffers"].append({k: v.clone() for k, v in model.named_buffers()})
        out[way] = record
    return out


def _worker(rank: int, folder: Path) -> None:
    import torch.distributed as dist

    from normbench import distributed
    from normbench.norms import SyncBatchNorm

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{folder / 'store'}", rank=rank, world_size=WORLD
    )
    results: dict = {}
    w, b = _params()
    for name, (kwargs, split, channels_last) in CASES.items():
        layer = SyncBatchNorm(C, dtype=torch.float64, **kwargs)
        if layer.weight is not None:
            with torch.no_grad():
                layer.weight.copy_(w)
                layer.bias.copy_(b)
        results[name] = _steps(layer, rank, split, channels_last)

    # torch's algorithm, float64, on this rank's part of step 0
    lo, hi = _bounds(rank, None)
    x, dy = _data(0)
    rm, rv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    results["torch_math"] = _torch_sync_math(x[lo:hi], w, b, rm, rv, 0.1, 1e-5, dy[lo:hi])

    # float32: normbench's layer against the same algorithm
    layer = SyncBatchNorm(C)
    with torch.no_grad():
        layer.weight.copy_(w.float())
        layer.bias.copy_(b.float())
    results["float32"] = _steps(layer, rank, None, False, torch.float32)

    # torch's own module, where this torch runs it on the CPU
    try:
        module = torch.nn.SyncBatchNorm(C, dtype=torch.float64)
        with torch.no_grad():
            module.weight.copy_(w)
            module.bias.copy_(b)
        results["torch_module"] = _steps(module, rank, None, False)
    except ValueError as err:
        results["torch_module"] = str(err)

    # group sizes: the groups of consecutive ranks, and a size that does not divide
    results["ranks"] = distributed.sync_ranks(1, 4), distributed.sync_ranks(None, 4)
    try:
        SyncBatchNorm(C, group_size=3)(torch.randn(4, C, 2, 2))
        results["refused"] = None
    except UserError as err:
        results["refused"] = str(err)

    results["ddp"] = {norm: _ddp_steps(rank, norm) for norm in DDP_NORMS}

    # an empty batch on every process (each takes part in the reduction)
    layer = SyncBatchNorm(C, dtype=torch.float64)
    y = layer(torch.empty(0, C, 2, 2, dtype=torch.float64))
    results["empty"] = (tuple(y.shape), int(layer.num_batches_tracked), layer.running_var)

    torch.save(results, folder / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """The two processes' results (one start of both for every test here)."""
    folder = tmp_path_factory.mktemp("distributed")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--rank", str(rank), str(folder)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in range(WORLD)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, output in zip(procs, outputs, strict=True):
        assert p.returncode == 0, output
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _single(layer, split=None, channels_last=False, dtype=torch.float64) -> dict:
    """The same steps in one process over the whole batch."""
    return _steps(layer, 0, (BATCH,) if split is None else (sum(split),), channels_last, dtype)


def _layer(cls, dtype=torch.float64, **kwargs):
    w, b = _params(dtype)
    layer = cls(C, dtype=dtype, **kwargs)
    if layer.weight is not None:
        with torch.no_grad():
            layer.weight.copy_(w)
            layer.bias.copy_(b)
    return layer


def _close(a, b, tol=TOL):
    assert a.shape == b.shape
    assert (a.double() - b.double()).abs().max().item() <= tol, (a - b).abs().max()


def _assert_whole_batch(parts: list[dict], whole: dict, split=None, tol=TOL) -> None:
    """Each rank's outputs and input gradients are its rows of the whole batch's; the weight
    and bias gradients add up to the whole batch's; running statistics as the whole batch's,
    the same bits on every rank."""
    for step in range(STEPS):
        for key in ("y", "dx"):
            _close(torch.cat([p[key][step] for p in parts]), whole[key][step], tol)
        if whole["dw"]:
            for key in ("dw", "db"):
                _close(sum(p[key][step] for p in parts), whole[key][step], tol)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(parts[0]["state"][key], parts[1]["state"][key])
        _close(parts[0]["state"][key], whole["state"][key], tol)


@pytest.mark.parametrize(
    "case", ["global", "relu", "channels_last", "cumulative", "reference", "uneven",
             "group_of_2", "no_affine", "pooled"],
)  # fmt: skip
def test_sync_bn_is_custom_bn_over_the_whole_batch(ranks, case):
    """sync_bn on two processes with half the batch each (or 3 and 5 samples) gives custom_bn's
    results over the whole batch in one process, to 1e-10 in float64."""
    from normbench.norms import BatchNorm

    kwargs, split, channels_last = CASES[case]
    kwargs = {k: v for k, v in kwargs.items() if k != "group_size"}
    whole = _single(_layer(BatchNorm, **kwargs), split, channels_last)
    _assert_whole_batch([r[case] for r in ranks], whole, split)


def test_group_size_1_is_ghost_bn_of_the_per_process_batch(ranks):
    """group_size=1: each process alone, ghost_bn with a ghost batch of B/2 (outputs and
    gradients); each rank's running statistics are custom_bn's over its own half."""
    from normbench.norms import BatchNorm, GhostBatchNorm

    parts = [r["local"] for r in ranks]
    ghost = _single(_layer(GhostBatchNorm, virtual_batch_size=BATCH // WORLD))
    for step in range(STEPS):
        for key in ("y", "dx"):
            assert torch.equal(torch.cat([p[key][step] for p in parts]), ghost[key][step])
        for key in ("dw", "db"):
            _close(sum(p[key][step] for p in parts), ghost[key][step])
    for rank, part in enumerate(parts):
        own = _steps(_layer(BatchNorm), rank, None, False)
        for key, value in own["state"].items():
            assert torch.equal(part["state"][key], value), key


def test_sync_bn_follows_torch_sync_batch_norm_math(ranks):
    """Against torch.nn.SyncBatchNorm's algorithm (its all_gather of mean, invstd and count,
    combination and backward, in float64 on the same inputs and processes): step 0's outputs,
    gradients and running statistics; float32 within float32's tolerance."""
    for r in ranks:
        ref = r["torch_math"]
        for key in ("y", "dx", "dw", "db"):
            _close(r["global"][key][0], ref[key])
            _close(r["float32"][key][0], ref[key], 1e-4)
    # the running statistics after one step: the second step's layer moved them again, so
    # check them with a one-step run of the whole batch
    from normbench.norms import BatchNorm

    layer = _layer(BatchNorm)
    x, dy = _data(0)
    layer(x)
    for key in ("running_mean", "running_var"):
        _close(ranks[0]["torch_math"][key], getattr(layer, key))
        assert torch.equal(ranks[0]["torch_math"][key], ranks[1]["torch_math"][key])
    module = ranks[0]["torch_module"]
    if isinstance(module, str):  # torch's module refuses the CPU (its operators have no CPU kernel)
        assert "GPU" in module
    else:
        _assert_whole_batch([r["torch_module"] for r in ranks], _single(_layer(BatchNorm)))


@pytest.mark.parametrize("norm", DDP_NORMS)
def test_a_data_parallel_step_is_torch_ddps_with_one_collective(ranks, norm):
    """normbench's gradient reduction (the loss and rank 0's buffers in the gradients'
    all_reduce) against torch's DistributedDataParallel as it comes (buffers broadcast
    before each forward): each rank's losses and the parameters after every step are the
    same, so rank 1's forwards met the buffers DDP would have given it (Batch Renorm's
    read them); rank 0's buffers are the same; every rank's buffers are rank 0's after
    each step, which DDP's broadcast leaves until the next forward; the global loss is
    the sum over the processes, and a NaN on one rank reaches every rank at that step."""
    for rank in range(WORLD):
        ours, theirs = ranks[rank]["ddp"][norm]["normbench"], ranks[rank]["ddp"][norm]["torch"]
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-6, abs=1e-7)
        assert ours["total"] == pytest.approx(theirs["total"], rel=1e-6, nan_ok=True)
        assert torch.isnan(torch.tensor(ours["total"][-1]))
        for mine, torchs in zip(ours["params"], theirs["params"], strict=True):
            for a, b in zip(mine, torchs, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        for step, buffers in enumerate(ours["buffers"]):
            assert buffers, "the model has buffers to carry"
            for name, value in buffers.items():
                zero = ranks[0]["ddp"][norm]["normbench"]["buffers"][step][name]
                assert torch.equal(value, zero), (rank, step, name)
                torch.testing.assert_close(
                    value, ranks[0]["ddp"][norm]["torch"]["buffers"][step][name],
                    rtol=1e-6, atol=1e-7,
                )  # fmt: skip
    losses = [ranks[r]["ddp"][norm]["normbench"]["loss"] for r in range(WORLD)]
    totals = ranks[0]["ddp"][norm]["normbench"]["total"][:-1]
    assert totals == pytest.approx([3 * (a + b) for a, b in zip(*losses, strict=True)], rel=1e-6)


def test_group_size_must_divide_the_processes(ranks):
    assert ranks[0]["ranks"] == ([[0], [1], [2], [3]], [[0, 1, 2, 3]])
    message = ranks[0]["refused"]
    assert message is not None and "does not divide the 2 processes" in message
    assert "\n" not in message


def test_group_size_checks_without_processes():
    from normbench import distributed

    assert distributed.sync_ranks(2, 4) == [[0, 1], [2, 3]]
    with pytest.raises(UserError, match="group_size=3 does not divide the 4 processes"):
        distributed.sync_ranks(3, 4)
    with pytest.raises(UserError, match="at least 1"):
        distributed.check_group_size(0, 4)
    assert distributed.world_size() == 1
    assert distributed.sync_group(None) is None


@pytest.mark.parametrize("relu", [False, True])
def test_one_process_is_custom_bn_exactly(relu):
    """With no process group, sync_bn is custom_bn bit for bit (float32, the CPU kernel)."""
    from normbench.norms import BatchNorm, SyncBatchNorm

    torch.manual_seed(0)
    a, b = SyncBatchNorm(4, relu=relu), BatchNorm(4, relu=relu)
    for _ in range(2):
        x = torch.randn(6, 4, 5, 5, requires_grad=True)
        x2 = x.detach().clone().requires_grad_(True)
        ya, yb = a(x), b(x2)
        assert torch.equal(ya, yb)
        ya.square().sum().backward()
        yb.square().sum().backward()
        assert torch.equal(x.grad, x2.grad)
        assert torch.equal(a.weight.grad, b.weight.grad)
    for key, value in b.state_dict().items():
        assert torch.equal(a.state_dict()[key], value)


def test_one_processs_small_cnn_is_custom_bns_bit_for_bit():
    """small_cnn with sync_bn and no process group trains as with custom_bn, bit for bit:
    the same layers, the norm, ReLU and max-pooling fused alike (as a run has it:
    channels_last, float32)."""
    from normbench.models import build_model, set_memory_format
    from normbench.norms import NormSpec

    seen = []
    for name in ("custom_bn", "sync_bn"):
        torch.manual_seed(0)
        model = build_model("small_cnn", NormSpec(name, {}), 1, 10, (12, 12))
        set_memory_format(model, "channels_last")
        assert [type(m).__name__ for m in model.modules()].count("MaxPool2d") == 0
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        g = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(3):
            x, y = torch.randn(8, 1, 12, 12, generator=g), torch.randint(10, (8,), generator=g)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        seen.append((losses, [t.clone() for t in model.state_dict().values()]))
    assert seen[0][0] == seen[1][0]
    assert all(torch.equal(a, b) for a, b in zip(seen[0][1], seen[1][1], strict=True))


def test_an_empty_batch_on_every_process_is_one_processs_empty_batch(ranks):
    from normbench.norms import BatchNorm

    layer = BatchNorm(C, dtype=torch.float64)
    y = layer(torch.empty(0, C, 2, 2, dtype=torch.float64))
    for rank in ranks:
        shape, counted, running_var = rank["empty"]
        assert shape == tuple(y.shape) == (0, C, 2, 2)
        assert counted == int(layer.num_batches_tracked) == 1
        assert torch.equal(running_var, layer.running_var)  # (ones: left as they were)


HANG = """
import os, sys, time
from pathlib import Path

import torch
import torch.distributed as dist

from normbench import distributed
from normbench.norms import SyncBatchNorm

rank, folder = int(os.environ["RANK"]), Path(sys.argv[1])
distributed.join("cpu", 2.0, store=dist.FileStore(str(folder / "store"), 4))
layer = SyncBatchNorm(3, group_size=2)
layer(torch.randn(4, 3))  # every rank: the groups {0, 1} and {2, 3} are made
if rank == 3:  # hangs until its partner has given up on it (or for a minute)
    deadline = time.monotonic() + 60
    while not (folder / "gave-up").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
start = time.monotonic()
try:
    layer(torch.randn(4, 3))
    outcome = "returned"
except Exception as err:
    outcome = "lost peer" if distributed.lost_peer(err) else repr(err)
print(f"{outcome} after {time.monotonic() - start:.1f} s", flush=True)
if rank == 2:
    (folder / "gave-up").touch()
os._exit(0)  # (no destroy: the lost peer's group)
"""


def test_a_sync_groups_collectives_wait_as_long_as_the_runs_process_group(tmp_path):
    """group_size=2 of 4 processes: rank 3 hangs; its partner, rank 2, gives up after the
    run's timeout (2 s here) as the default group's collectives would, not after torch's
    default for a new group (30 minutes on gloo). Ranks 0 and 1 are not held up."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "4"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", HANG, str(tmp_path)],
            env={**env, "RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for r in range(4)
    ]
    outputs = [p.communicate(timeout=180) for p in procs]
    said = [out.strip() for out, _ in outputs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert said[0].startswith("returned") and said[1].startswith("returned"), said
    outcome, seconds = said[2].rsplit(" after ", 1)
    assert outcome == "lost peer" and float(seconds.split()[0]) < 30, said


def test_convert_sync_batchnorm_replaces_every_batchnorm_as_torchs_does():
    from normbench.norms import BatchNorm2d, SyncBatchNorm

    torch.manual_seed(2)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, C, 1),
        torch.nn.BatchNorm2d(C),
        torch.nn.Sequential(BatchNorm2d(C, relu=True, backend="reference"), torch.nn.Identity()),
        torch.nn.BatchNorm2d(C, affine=False, momentum=None),
    ).double()
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    model(x)  # running statistics that differ from their initial values
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    expected = model(x)
    converted = SyncBatchNorm.convert_sync_batchnorm(model)
    assert converted is model  # (its children replaced in place, as torch's)
    layers = [converted[1], converted[2][0], converted[3]]
    assert all(type(layer) is SyncBatchNorm for layer in layers)
    assert converted[2][0].relu and converted[2][0].backend == "reference"
    assert converted[3].weight is None and converted[3].momentum is None
    assert not any(layer.training for layer in layers)
    assert list(converted.state_dict()) == list(before)
    for key, value in converted.state_dict().items():
        assert torch.equal(value, before[key]), key
    # one process, no group: custom_bn, the same eval outputs
    assert torch.allclose(converted(x), expected, rtol=0, atol=1e-12)
    layer = SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm1d(C))
    assert type(layer) is SyncBatchNorm
    pooled = SyncBatchNorm.convert_sync_batchnorm(BatchNorm2d(C, relu=True, pool=True))
    assert pooled.relu and pooled.pool


def test_state_dict_moves_to_and_from_torch_sync_batch_norm():
    from normbench.norms import SyncBatchNorm

    torch.manual_seed(1)
    ours = SyncBatchNorm(4)
    ours(torch.randn(8, 4, 3, 3) * 2 + 1)
    theirs = torch.nn.SyncBatchNorm(4)
    theirs.load_state_dict(ours.state_dict())
    back = SyncBatchNorm(4)
    back.load_state_dict(theirs.state_dict())
    assert list(theirs.state_dict()) == list(ours.state_dict())
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value)
    with pytest.raises(ValueError, match="not both"):
        SyncBatchNorm(4, process_group=object(), group_size=2)


@pytest.mark.skipif(not TORCH_TAKES_BIAS, reason="this torch's BatchNorm has no bias keyword")
def test_sync_batch_norm_without_a_bias_loads_torchs():
    from normbench.norms import SyncBatchNorm

    theirs = torch.nn.SyncBatchNorm(4, bias=False)
    ours = SyncBatchNorm(4, bias=False)
    assert ours.bias is None and list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    converted = SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm2d(4, bias=False))
    assert converted.bias is None and converted.weight is not None


if __name__ == "__main__":
    if sys.argv[1:2] == ["--rank"]:
        _worker(int(sys.argv[2]), Path(sys.argv[3]))


SLURM_TASK = """
import sys

import torch

from normbench import distributed

rank, value, timeout_s = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
try:
    distributed.join_task(distributed.Rank(rank, 2, rank), "cpu", timeout_s)
except RuntimeError as err:
    print(str(err).splitlines()[0])
    sys.exit(3)
total = torch.tensor([value])
torch.distributed.all_reduce(total)
print(f"sum {total.item():g}")
distributed.leave()
"""


def test_slurm_jobs_that_find_the_same_port_never_join_each_others_runs():
    """Two SLURM jobs whose ids are PORT_SPAN apart take the same rendezvous port. Job B's
    rank 0 finds it taken and says so in one line; B's rank 1, which reaches job A's
    store, waits for its own job's keys and times out, rather than joining A's run as
    its rank 1 (A's all_reduce then summed B's numbers); A completes with its own two
    ranks. (Each task as SLURM starts it: SLURM_JOB_ID in the environment, 127.0.0.1.)"""
    import random
    import socket
    import time

    from normbench import distributed

    job_a = random.randrange(1000, 10000)
    job_b = job_a + distributed.PORT_SPAN
    port = distributed.PORT_BASE + job_a % distributed.PORT_SPAN

    def task(job: int, rank: int, value: float) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["SLURM_JOB_ID"] = str(job)
        # A waits for its rank 1 however long a loaded machine takes to start it (6 s did
        # not do under CI); B's rank 1 is to give up, soon
        timeout_s = 120 if job == job_a else 6
        return subprocess.Popen(
            [sys.executable, "-c", SLURM_TASK, str(rank), str(value), str(timeout_s)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    def listening() -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    a0 = task(job_a, 0, 1)
    deadline = time.monotonic() + 60
    while not listening():
        assert a0.poll() is None and time.monotonic() < deadline, a0.communicate()
        time.sleep(0.05)
    b0, b1 = task(job_b, 0, 100), task(job_b, 1, 1000)
    out, err = b0.communicate(timeout=60)
    assert b0.returncode == 3, err
    assert out.strip() == (
        f"the rendezvous port {port} on 127.0.0.1 of SLURM job {job_b} is taken (by another "
        f"program, or a job whose id is a multiple of {distributed.PORT_SPAN} away)"
    )
    a1 = task(job_a, 1, 10)
    for rank in (a0, a1):
        out, err = rank.communicate(timeout=60)
        assert rank.returncode == 0, err
        assert out.strip() == "sum 11"  # A's own ranks: 1 + 10
    out, err = b1.communicate(timeout=60)
    assert b1.returncode != 0 and "sum" not in out, out + err


IGNORING = """
import os, signal, subprocess, sys
from normbench import distributed

seen = []
signal.signal(signal.SIGINT, lambda *a: seen.append("handled"))
with distributed._ignoring(signal.SIGINT):
    os.kill(os.getpid(), signal.SIGINT)  # as a Ctrl-C while the fork server starts
    child = subprocess.run([sys.executable, "-c", "import signal; "
                            "print(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)"],
                           capture_output=True, text=True).stdout.strip()
    seen.append("inside")
print(",".join(seen), child, signal.pthread_sigmask(signal.SIG_BLOCK, []) == set())
"""


def test_a_signal_while_the_servers_start_is_handled_once_they_have():
    """What starts inside ``_ignoring`` (the fork server, the resource tracker) ignores
    SIGINT; a SIGINT that comes meanwhile is not lost (it was: a Ctrl-C in those
    milliseconds let the run go on to its end) but handled by the launching process's own
    handler as the scope is left; nothing stays blocked."""
    done = subprocess.run(
        [sys.executable, "-c", IGNORING], capture_output=True, text=True, timeout=60
    )
    assert done.stdout.split() == ["inside,handled", "True", "True"], done.stderr


FROZEN = """
import gc, multiprocessing
from normbench import distributed

def freeze_count(queue):
    queue.put(gc.get_freeze_count())

if __name__ == "__main__":
    distributed.prestart(["json", "normbench.preloaded"])
    context = multiprocessing.get_context(distributed.START_METHOD)
    queue = context.Queue()
    worker = context.Process(target=freeze_count, args=(queue,))
    worker.start()
    print(queue.get(timeout=60), gc.get_freeze_count())
    worker.join()
"""


def test_the_fork_server_freezes_the_collector_over_its_imports(tmp_path):
    """The fork server's last preload (``normbench.preloaded``) freezes its heap: the
    workers forked from it inherit the frozen objects (and the server's exit no longer
    collects torch's objects, a second after the run's end); the launching process's own
    collector is left alone."""
    from normbench import distributed

    assert distributed.WORKER_MODULES[-1] == "normbench.preloaded"
    script = tmp_path / "frozen.py"
    script.write_text(FROZEN)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    in_worker, in_launcher = map(int, done.stdout.split())
    assert in_worker > 1000 and in_launcher == 0


SERVER_ENV = """
import os, signal, time
from multiprocessing import forkserver
from normbench import distributed

os.environ["NB_PROBE"] = "first"
distributed.prestart(["os"])
first = forkserver._forkserver._forkserver_pid
os.kill(first, signal.SIGKILL)  # as a stopped run stops it
time.sleep(0.2)
os.environ["NB_PROBE"] = "second"
distributed.prestart(["os"])
print(first != forkserver._forkserver._forkserver_pid,
      distributed.worker_environment()["server"]["NB_PROBE"])
"""


def test_a_fork_server_started_anew_is_known_by_its_own_environment():
    """The workers tell their agent's variables from the server's by the environment the
    server started with: a server started anew (with another run's environment) is taken
    again, or a worker kept the earlier run's variables as its agent's."""
    done = subprocess.run([sys.executable, "-c", SERVER_ENV], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.stdout.split() == ["True", "second"], done.stderr

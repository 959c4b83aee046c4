"""Process groups and synchronized BatchNorm's reductions, on torch.distributed.

One run on many processes uses torch.distributed (gloo on the CPU, NCCL on CUDA). This
module holds what the layers need from it, and nothing of the runner's:

- :func:`world_size` and :func:`sync_group`: the group a synchronized BatchNorm reduces
  over. ``group_size`` k makes groups of k consecutive ranks (k = 1: each process alone,
  local BatchNorm; k = the world size, or None: every process); a k that does not divide
  the world size is refused with one :class:`~normbench.errors.UserError` line.
- :func:`reduce_statistics`: the per-channel batch statistics of every process in a group
  combined into the group's, with one ``all_reduce`` per call. Each process writes its
  ``(count, mean, M2)`` into its own row of a zeroed ``(k, 1 + 2C)`` float64 table, and the
  sum over the group is every row at once, exact (adding zeros rounds nothing); every
  process then merges the rows in the same order by the parallel-variance formula (Chan,
  Golub & LeVeque), so the merged statistics, and the running statistics made from them,
  are the same bits on every rank, and a large mean against the spread costs no precision
  (a sum of squares would lose it: ``E[x^2] - E[x]^2``). The table is k times a sum's size;
  at BatchNorm's sizes (C values per layer) that is a few KiB, and torch's SyncBatchNorm
  exchanges as much (an ``all_gather`` of every rank's mean and invstd).
- :func:`reduce_sums`: the backward's two per-channel sums, added over the group in float64
  with one ``all_reduce`` (they are plain sums around the group's mean: no cancellation).

torch is imported inside the functions (the package's commands that never train import
none of it).
"""

from __future__ import annotations

from typing import Any

from normbench.errors import UserError

__all__ = [
    "SyncGroup",
    "check_group_size",
    "reduce_statistics",
    "reduce_sums",
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
            f"norm.group_size={group_size} does not divide the {size} processes into whole "
            f"groups; use a divisor of {size}"
        )
    return group_size


def sync_ranks(group_size: int | None, size: int) -> list[list[int]]:
    """The groups of ``group_size`` consecutive ranks of ``size`` processes (checked)."""
    k = check_group_size(group_size, size)
    return [list(range(start, start + k)) for start in range(0, size, k)]


class SyncGroup:
    """The processes one layer synchronizes with: ``group`` (a process group; None for the
    default one), this process's ``index`` in it (its row in :func:`reduce_statistics`'s
    table) and its ``size``."""

    __slots__ = ("group", "index", "size")

    def __init__(self, group: Any, index: int, size: int) -> None:
        self.group, self.index, self.size = group, index, size

    def __repr__(self) -> str:
        return f"SyncGroup(index={self.index}, size={self.size})"


# Process groups made for a group size, by (world size, group size): new_group is a
# collective over every process, so each is made once and by all, in the same order.
_groups: dict[tuple[int, int], SyncGroup] = {}


def sync_group(group_size: int | None = None, process_group: Any = None) -> SyncGroup | None:
    """The group this process synchronizes with; None where it synchronizes with nobody
    (no process group initialized, one process, a group of one): then a synchronized
    BatchNorm is local BatchNorm.

    ``process_group`` (torch.nn.SyncBatchNorm's argument) is used as it is; else the
    default group split into groups of ``group_size`` consecutive ranks (None: one group
    of every process). Every process must ask for the same group sizes in the same order
    (as every process builds the same model)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
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
    key = (size, k)
    if key not in _groups:
        mine = None
        for ranks in sync_ranks(k, size):
            group = dist.new_group(ranks)  # every rank makes every group (a collective)
            if rank in ranks:
                mine = SyncGroup(group, ranks.index(rank), k)
        _groups[key] = mine
    return _groups[key]


def reduce_statistics(count: int, mean: Any, var: Any, sync: SyncGroup) -> tuple[int, Any, Any]:
    """The group's ``(count, mean, var)`` per channel from each process's own: ``count``
    values per channel, their ``mean`` and biased ``var`` (C values each). One
    ``all_reduce``; float64 results, the same bits on every process of the group. A process
    with no values (count 0) adds nothing."""
    import torch
    import torch.distributed as dist

    channels = mean.numel()
    table = torch.zeros(sync.size, 1 + 2 * channels, dtype=torch.float64, device=mean.device)
    if count > 0:
        row = table[sync.index]
        row[0] = count
        row[1 : 1 + channels] = mean.reshape(-1)
        row[1 + channels :] = var.reshape(-1).to(torch.float64) * count  # M2
    dist.all_reduce(table, group=sync.group)
    counts = table[:, :1]
    total = int(counts.sum().item())
    means, m2s = table[:, 1 : 1 + channels], table[:, 1 + channels :]
    if total == 0:
        nan = torch.full((channels,), float("nan"), dtype=torch.float64, device=mean.device)
        return 0, nan, nan.clone()
    # Chan et al.'s merge of k parts at once: the parts' M2 plus their means' spread
    # around the whole mean (each deviation taken directly, not as a difference of squares)
    merged = (counts * means).sum(0) / total
    m2 = m2s.sum(0) + (counts * (means - merged).square()).sum(0)
    return total, merged, m2 / total


def reduce_sums(first: Any, second: Any, sync: SyncGroup) -> tuple[Any, Any]:
    """Two per-channel sums added over the group, in float64, with one ``all_reduce``."""
    import torch
    import torch.distributed as dist

    channels = first.numel()
    both = torch.cat([first.reshape(-1), second.reshape(-1)]).to(torch.float64)
    dist.all_reduce(both, group=sync.group)
    return both[:channels], both[channels:]

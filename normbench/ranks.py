"""What a run's processes do with its folder besides rank 0's writing: restore the run's
last checkpoint (:func:`resume_run`, every rank of a data-parallel run reads it), and the
part of a data-parallel run on SLURM that the tasks of rank > 0 take (:func:`follow`):
they train with rank 0 and write nothing. The runner (:mod:`normbench.runner`) does the
rest.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from normbench import cores
from normbench.build import Prepared, prepare
from normbench.errors import UserError


def resume_run(cfg, rid: str, folder: Path, prepared: Prepared) -> tuple[dict | None, Prepared]:
    """The loop's state to go on from, restored into the prepared model, optimizer and
    torch's random generators; None when the run starts over. A checkpoint the code
    cannot go on from (cut short, another version's, a model that changed since) is
    not a user error: one warning line, and the run trains from the start on a model
    and optimizer built anew, as a half-restored one must never train."""
    if cfg.checkpoint.save != "last":
        return None, prepared
    from normbench import checkpoints, received

    path = folder / checkpoints.FILE
    try:  # a regular file no larger than this model's checkpoint can be (not a pipe)
        data = received.read_bytes(path, checkpoints.max_bytes(prepared.model))
    except FileNotFoundError:
        return None, prepared
    except OSError as err:  # an empty folder or a pipe in its place, too large, no permission
        warn_discarded(rid, err.strerror or str(err))
        return None, prepared
    try:
        state = checkpoints.load(data, rid)
    except checkpoints.Unusable as why:
        warn_discarded(rid, str(why))
        return None, prepared
    try:
        validation = prepared.data.num_val > 0
        return checkpoints.restore(
            state, prepared.model, prepared.optimizer, epochs(prepared), validation
        ), prepared
    except checkpoints.Unusable as why:
        warn_discarded(rid, str(why))
        return None, prepare(cfg, threads=prepared.threads)


def epochs(prepared: Prepared) -> int:
    """The run's epochs, as the training loop counts them."""
    from normbench.data import steps_per_epoch

    per_epoch = steps_per_epoch(prepared.data.num_train, prepared.settings.batch_size)
    return -(-prepared.settings.total_steps(prepared.data.num_train) // per_epoch)


def warn_discarded(rid: str, why: str) -> None:
    """One line on stderr (above any progress bar, which has not started yet)."""
    from normbench.terminal import clean

    sys.stderr.write(
        f"warning: run {rid}: its checkpoint cannot be resumed ({clean(why)}): "
        "discarded, training from the first epoch\n"
    )
    sys.stderr.flush()


def follow(cfg, rid: str, folder: Path, task) -> str | None:
    """A SLURM task of rank > 0 (``task``): train with rank 0 if it says the run trains
    (from the epoch it says), and return the training's status; None at once where it
    does not train. Writes nothing."""
    import torch

    from normbench import distributed
    from normbench.train import TrainResult, train

    decision = distributed.hear()
    if decision is None:
        return None
    try:
        with distributed.local():
            prepared = prepare(cfg, threads=cores.choose(cfg.threads))
            resume = None
            if decision[1] is not None:  # rank 0 resumes from its checkpoint: so does this
                resume, prepared = resume_run(cfg, rid, folder, prepared)
                if resume is None or resume["epoch"] != decision[1]:
                    raise RuntimeError(
                        f"rank {task.rank} could not resume from rank 0's checkpoint of "
                        f"epoch {decision[1]} in {folder}"
                    )
        generator = torch.Generator().manual_seed(cfg.seed)
        data, optimizer, settings = prepared.data, prepared.optimizer, prepared.settings
        result: TrainResult = train(
            prepared.model, data, optimizer, settings, generator, None, resume, task
        )
    except Exception as err:
        if distributed.lost_peer(err):
            distributed.peer_lost()
        raise
    return result.status


def follower(cfg) -> bool:
    """Whether this process is a SLURM task of rank > 0 of a data-parallel run: one that
    writes nothing (rank 0 records the run, and what stopped it)."""
    from normbench import distributed

    try:
        task = distributed.slurm_task(cfg.processes * cfg.nodes)
    except UserError:  # (said by rank 0 too, which records it)
        return int(os.environ.get("SLURM_PROCID") or 0) > 0
    return task is not None and task.rank > 0

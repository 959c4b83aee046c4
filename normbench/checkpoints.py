"""A run's checkpoint: everything needed to go on after an epoch as if never stopped.

After every epoch the runner writes ``<run_dir>/checkpoint.pt`` (atomically): the
model's and optimizer's state, the training loop's (epoch, steps, the records so far,
the learning-rate schedule, the generator that orders batches and draws augmentation)
and torch's global random states. A run started again with the same config resumes
after that epoch, and its metrics are those of a run that was never interrupted (bit
for bit on the CPU at the same thread count). This module packs and unpacks; the
runner decides when, and writes.
"""

from __future__ import annotations

import io
from typing import Any

import torch
from torch import nn

FILE = "checkpoint.pt"
VERSION = 1


def pack(
    run_id: str, model: nn.Module, optimizer: torch.optim.Optimizer, loop: dict[str, Any]
) -> bytes:
    """The checkpoint's bytes after an epoch (``loop``: what ``train`` hands its callbacks)."""
    state = {
        "version": VERSION,
        "run_id": run_id,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "loop": loop,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def unpack(data: bytes, run_id: str) -> dict[str, Any] | None:
    """The checkpoint in ``data`` when it is this run's and whole; None otherwise (another
    version's, another config's, cut short by a full disk): the run then starts over."""
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # anything torch cannot read back is no checkpoint of ours
        return None
    if not isinstance(state, dict) or state.get("version") != VERSION:
        return None
    return state if state.get("run_id") == run_id else None


def restore(
    state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Put the checkpoint's states back into ``model``, ``optimizer`` and torch's random
    generators; the loop's state, for ``train(resume=...)``."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["loop"]

"""Shared test setup: Triton's interpreter where there is no GPU; config composition."""

import os

import pytest
import torch

from normbench.config import compose

# Triton reads this when it is imported: without CUDA its kernels run on the CPU only as
# the interpreter, which is how tests/test_kernels_triton.py checks them here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def tiny(tmp_path):
    """Compose a seconds-long config writing under ``tmp_path``."""

    def make(*overrides):
        base = [
            f"out_dir={tmp_path / 'results'}",
            "epochs=1",
            "batch_size=64",
            "dataset.train_size=256",
            "threads=1",
        ]
        return compose([*base, *overrides])

    return make

"""Shared fixtures: config composition into a temporary results folder."""

import pytest

from normbench.config import compose


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

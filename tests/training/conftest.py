"""Fixtures of the training tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from training_helpers import make_config


@pytest.fixture()
def config_for(tiny_reference: Path, tmp_path: Path):  # noqa: ANN201
    """``config_for("name", **optim)``: a configuration whose run goes to ``tmp_path / name``."""
    return lambda name, **optim: make_config(tiny_reference, tmp_path / name, **optim)


@pytest.fixture(autouse=True)
def one_torch_thread():  # noqa: ANN201
    """The tiny models gain nothing from threads, and on a busy 2-core machine two threads
    per process made a step ~10x slower (threads waiting for each other)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

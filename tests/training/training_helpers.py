"""Helpers of the training tests (imported by them): a tiny model, runs on the tiny reference data,
callbacks that crash a run."""

from __future__ import annotations

import csv
from pathlib import Path

from spherical_channels.training import Callback, TrainConfig

TINY_MODEL = dict(num_interactions=2, lmax=2, mmax=1, sphere_channels=8, sphere_channels_reduce=8, hidden_channels=16,
                  num_sphere_samples=16, num_basis_functions=8, cutoff=5.0, max_num_neighbors=16)


def make_config(data: Path, out: Path, **optim) -> TrainConfig:
    """12 steps of the tiny model on the tiny data (15 training structures: 4 steps per epoch)."""
    return TrainConfig.from_dict({
        "model": TINY_MODEL,
        "optim": {"batch_size": 4, "lr_initial": 2e-3, "warmup_steps": 2, "scheduler": "cosine", "max_steps": 12, **optim},
        "dataset": {"train": str(data / "s2ef" / "train.extxyz"), "val": str(data / "s2ef" / "val_id.extxyz")},
        "run": {"output_dir": str(out), "log_every": 1, "progress": False, "plots": False},
    })


def read_csv(path: Path) -> list[dict]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


class Crash(Exception):
    """What :class:`CrashAt` raises (a process killed mid-run, as far as the files go)."""


class CrashAt(Callback):
    """Raises :class:`Crash` after step ``step``, leaving the files as a killed process would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, result) -> None:  # noqa: ANN001
        if result.step == self.step:
            raise Crash(f"crash after step {self.step}")

"""Run logs: one CSV row per logged event, and TensorBoard scalars alongside."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Any

__all__ = ["RunLogger"]


class RunLogger:
    """Appends ``{step, phase, ...}`` rows to ``metrics.csv`` and writes TensorBoard scalars.

    The CSV has a fixed column set per phase file (``train.csv``, ``val.csv``); a resumed run
    appends to the existing files. TensorBoard is optional: without the ``tensorboard``
    package only a warning is given.
    """

    def __init__(self, directory: str | Path, tensorboard: bool = True) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._fields: dict[str, list[str]] = {}  # each phase file's columns, read or set once
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.directory / "tensorboard"))
            except ImportError:
                warnings.warn("tensorboard is not installed: logging to CSV only", stacklevel=2)

    def log(self, phase: str, step: int, values: dict[str, Any]) -> None:
        row = {"step": step, **{k: v for k, v in values.items() if isinstance(v, (int, float, str))}}
        path = self.directory / f"{phase}.csv"
        new = not path.exists()
        if new:
            self._fields[phase] = list(row)
        elif phase not in self._fields:  # a resumed run: keep the file's columns
            with path.open() as fh:
                self._fields[phase] = next(csv.reader(fh), None) or list(row)
        fields = self._fields[phase]
        with path.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{phase}/{key}", value, step)

    def read(self, phase: str) -> list[dict[str, float]]:
        """The rows logged so far for ``phase`` (numbers as floats)."""
        path = self.directory / f"{phase}.csv"
        if not path.exists():
            return []
        with path.open() as fh:
            return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(fh)]

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _number(text: str) -> float | str:
    try:
        return float(text)
    except (TypeError, ValueError):
        return text

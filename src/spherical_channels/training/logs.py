"""Run logs: one CSV row per logged event, and TensorBoard scalars alongside."""

from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path
from typing import Any

__all__ = ["RunLogger", "read_log"]


class RunLogger:
    """Appends ``{step, ...}`` rows to ``<phase>.csv`` (``train.csv``, ``val.csv``) and writes
    TensorBoard scalars.

    The CSV has a fixed column set per phase file. A resumed run passes ``resume_step`` (the
    checkpoint's step): rows logged after it by the interrupted run are dropped from the CSV
    files, and TensorBoard purges its events after that step (``purge_step``), so the resumed
    run's rows replace them instead of repeating them. TensorBoard is optional: without the
    ``tensorboard`` package only a warning is given.
    """

    def __init__(self, directory: str | Path, tensorboard: bool = True, resume_step: int | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._fields: dict[str, list[str]] = {}  # each phase file's columns, read or set once
        self.dropped: dict[str, int] = {}  # rows removed on resume, per phase
        if resume_step is not None:
            for path in sorted(self.directory.glob("*.csv")):
                self.dropped[path.stem] = _truncate_after(path, resume_step)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                purge = None if resume_step is None else resume_step + 1
                self._tb = SummaryWriter(log_dir=str(self.directory / "tensorboard"), purge_step=purge)
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
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{phase}/{key}", value, step)

    def read(self, phase: str) -> list[dict[str, float]]:
        """The rows logged so far for ``phase`` (numbers as floats)."""
        return read_log(self.directory / f"{phase}.csv")

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_log(path: str | Path) -> list[dict[str, float]]:
    """The rows of a log CSV (numbers as floats); [] for a missing file."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as fh:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def _truncate_after(path: Path, step: int) -> int:
    """Drop the rows of ``path`` whose step is after ``step`` (and a torn last line); returns
    how many were dropped."""
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return 0
    header, body = rows[0], rows[1:]
    kept = [r for r in body if len(r) == len(header) and _step_of(r) is not None and _step_of(r) <= step]
    if len(kept) == len(body):
        return 0
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(kept)
    os.replace(tmp, path)
    return len(body) - len(kept)


def _step_of(row: list[str]) -> float | None:
    try:
        return float(row[0])
    except (IndexError, ValueError):
        return None


def _number(text: str) -> float | str:
    try:
        return float(text)
    except (TypeError, ValueError):
        return text

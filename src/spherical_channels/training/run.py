"""A run directory: its layout, the rules for starting or resuming a run in it, and its lock.

Layout::

    config.yaml                 the configuration in effect (rewritten on resume if it changed)
    checkpoints/last.pt         latest state (``--resume`` continues from here)
    checkpoints/best.pt         best validation force MAE so far (an exported model)
    logs/train.csv, val.csv     metrics; logs/tensorboard/ for TensorBoard
    plots/parity_val.png, learning_curves.png
    summary.json                final metrics and timings
    .lock                       held by the process training in the directory

Rules (:meth:`RunDirectory.check`): a new run needs a missing or empty directory; a directory
with anything in it is refused (continue a checkpointed run with ``resume``, or start afresh with
``overwrite``, which removes only what a run writes), so that two runs never mix their logs. A
resume needs ``checkpoints/last.pt``. One process at a time trains in a directory (the lock).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from ..models.checkpoint import remove_stale_temporaries

try:  # advisory locks; without fcntl (Windows) runs are not locked
    import fcntl
except ImportError:  # pragma: no cover - not on the platforms this is tested on
    fcntl = None

__all__ = ["RunDirectory", "RunDirectoryError"]

# At most this many entries are listed in a message.
_MAX_LISTED = 6


class RunDirectoryError(RuntimeError):
    """A run directory that cannot be used as asked (the message says why and what to do)."""


class RunDirectory:
    """The files of one training run under ``path`` (see the module docstring)."""

    CONFIG = "config.yaml"
    SUMMARY = "summary.json"
    LOCK = ".lock"
    #: What a run writes: ``overwrite`` removes these and nothing else.
    RUN_ENTRIES = ("config.yaml", "checkpoints", "logs", "plots", "summary.json", LOCK)

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock_handle: Any = None
        self._created = False

    # ------------------------------------------------------------------ layout
    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoints / "best.pt"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    @property
    def config_file(self) -> Path:
        return self.path / self.CONFIG

    @property
    def summary_file(self) -> Path:
        return self.path / self.SUMMARY

    def contents(self) -> list[str]:
        """Names of the entries in the directory, the lock file left out (sorted)."""
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.name != self.LOCK)

    def has_checkpoint(self) -> bool:
        return self.last_checkpoint.is_file()

    # ------------------------------------------------------------------ rules
    def check(self, resume: bool = False, overwrite: bool = False) -> None:
        """Raise :class:`RunDirectoryError` unless a run may start (or, with ``resume``,
        continue) here. Changes nothing."""
        if resume and overwrite:
            raise RunDirectoryError("--resume continues a run and --overwrite replaces it: give one of them")
        if self.path.exists() and not self.path.is_dir():
            raise RunDirectoryError(f"run.output_dir {self.path} is a file, not a directory; choose another run.output_dir")
        entries = self.contents()
        if resume:
            if self.has_checkpoint():
                return
            if not entries:
                raise RunDirectoryError(
                    f"--resume: {self.path} holds no run (no {self.last_checkpoint}); start it without --resume"
                )
            raise RunDirectoryError(
                f"--resume: {self.path} holds {_listing(entries)} but no checkpoint ({self.last_checkpoint}): its run "
                "stopped before writing one, so there is nothing to resume. Start afresh with --overwrite (removes "
                "what that run wrote) or choose another run.output_dir"
            )
        if not entries:
            return
        if overwrite:
            foreign = [e for e in entries if e not in self.RUN_ENTRIES]
            if foreign:
                raise RunDirectoryError(
                    f"--overwrite: {self.path} holds files a training run does not write ({_listing(foreign)}); "
                    "they are not removed: choose another run.output_dir"
                )
            return
        if self.has_checkpoint():
            raise RunDirectoryError(
                f"{self.path} already holds a run ({self.last_checkpoint}); continue it with --resume, start afresh "
                "with --overwrite, or choose another run.output_dir"
            )
        raise RunDirectoryError(
            f"{self.path} is not empty ({_listing(entries)}) but holds no checkpoint (a run that stopped before its "
            "first checkpoint, or other files): a new run would mix its logs and config.yaml with them. Start afresh "
            "with --overwrite (removes what a run writes) or choose another run.output_dir"
        )

    # ------------------------------------------------------------------ lock
    def acquire(self) -> None:
        """Create the directory if needed and take its lock (one training process per run)."""
        if self._lock_handle is not None:
            return
        if self.path.exists() and not self.path.is_dir():
            raise RunDirectoryError(f"run.output_dir {self.path} is a file, not a directory; choose another run.output_dir")
        self._created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        lock = self.path / self.LOCK
        handle = open(lock, "a+")  # noqa: SIM115 - held for the run's lifetime
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                owner = handle.read().strip() or "unknown"
                handle.close()
                self._remove_if_created()
                same = " (this process: close() the other Trainer first)" if owner == str(os.getpid()) else ""
                raise RunDirectoryError(
                    f"{self.path} is in use by another training process (pid {owner}{same}); wait for it to end or "
                    "choose another run.output_dir"
                ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock_handle = handle

    def release(self) -> None:
        """Drop the lock; a directory this object created and nothing was written to is removed."""
        handle, self._lock_handle = self._lock_handle, None
        if handle is None:
            return
        (self.path / self.LOCK).unlink(missing_ok=True)
        handle.close()  # closing the file releases the lock
        self._remove_if_created()

    def _remove_if_created(self) -> None:
        if self._created and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()
        self._created = False

    @property
    def locked(self) -> bool:
        return self._lock_handle is not None

    def open(self, resume: bool = False, overwrite: bool = False) -> None:
        """:meth:`acquire` then :meth:`check` (released again if the check fails)."""
        self.acquire()
        try:
            self.check(resume=resume, overwrite=overwrite)
        except BaseException:
            self.release()
            raise

    # ------------------------------------------------------------------ contents
    def clear(self) -> list[str]:
        """Remove what a previous run wrote (``overwrite``); returns the names removed."""
        removed = []
        for name in self.RUN_ENTRIES:
            path = self.path / name
            if name == self.LOCK or not (path.exists() or path.is_symlink()):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(name)
        return removed

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete partial checkpoint files left by a process killed while writing one."""
        return remove_stale_temporaries(self.checkpoints)

    def write_config(self, config: dict[str, Any]) -> list[str]:
        """Write ``config.yaml``; returns the ``section.key`` entries that differ from the file
        there before (empty for a new file)."""
        old = None
        if self.config_file.exists():
            try:
                old = yaml.safe_load(self.config_file.read_text())
            except yaml.YAMLError:
                old = {}
        changed = [] if old is None else _differences(old or {}, config)
        if old is None or changed:
            _write_atomic(self.config_file, yaml.safe_dump(config, sort_keys=False))
        return changed

    def write_summary(self, summary: dict[str, Any]) -> Path:
        _write_atomic(self.summary_file, json.dumps(summary, indent=2))
        return self.summary_file


def _listing(entries: list[str]) -> str:
    shown = ", ".join(entries[:_MAX_LISTED])
    return shown + (f", ... ({len(entries)} entries)" if len(entries) > _MAX_LISTED else "")


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new), key=str)
    out = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

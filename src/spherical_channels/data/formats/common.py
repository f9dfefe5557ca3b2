"""What every format module shares: the error type, the reader/writer protocols and
building an ``ase.Atoms`` with its targets attached."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Protocol

import numpy as np

from ..validation import StructureError, located_message

if TYPE_CHECKING:
    import ase

__all__ = [
    "DataError",
    "LazyLmdb",
    "StructureReader",
    "StructureWriter",
    "UnknownFormatError",
    "located",
    "make_atoms",
    "set_results",
    "stored_results",
]


class DataError(StructureError):
    """A structure file is missing, unreadable, empty, or holds a structure that fails
    validation (a :class:`~spherical_channels.data.validation.StructureError` that names its
    file; both are ``ValueError``).

    The message names the file and the structure index (and atoms where relevant);
    ``path`` and ``index`` hold them for programs (``index`` is None for errors about
    the whole file).
    """


class UnknownFormatError(DataError):
    """The format of a path cannot be told (unknown extension or name, mixed directory):
    callers may fall back to another reader (e.g. ``ase.io.read``) on this one only."""


def located(path: os.PathLike | str, index: Optional[int], what: str) -> DataError:
    """A :class:`DataError` whose message starts with ``"<path>: structure <index>: "``."""
    return DataError(located_message(what, path=path, index=index), path, index)


class StructureReader(Protocol):
    """One file (or LMDB environment) of structures, read one structure at a time.

    Readers must be picklable without open handles (``DataLoader`` workers get a
    copy) and reopen what they need lazily in each process.
    """

    path: Path

    def __len__(self) -> int: ...

    def read(self, index: int) -> "ase.Atoms":
        """Structure ``index`` (0-based, within this file), with stored results on a
        ``SinglePointCalculator``; raises :class:`DataError` if it cannot be parsed."""
        ...

    def close(self) -> None: ...


class StructureWriter(Protocol):
    """Appends structures to a new file; use as a context manager."""

    def write(self, atoms: "ase.Atoms") -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> "StructureWriter": ...

    def __exit__(self, *exc: Any) -> None: ...


def stored_results(atoms: "ase.Atoms") -> dict:
    """The results stored on ``atoms.calc`` (empty if none); never triggers a calculation."""
    return dict(getattr(atoms.calc, "results", None) or {})


def set_results(atoms: "ase.Atoms", results: dict) -> None:
    """Replace ``atoms.calc`` by a ``SinglePointCalculator`` holding ``results`` (or
    remove it when ``results`` is empty)."""
    from ase.calculators.singlepoint import SinglePointCalculator

    results = {k: v for k, v in results.items() if v is not None}
    if not results:
        atoms.calc = None
        return
    calc = SinglePointCalculator(atoms)
    # Set results directly: SinglePointCalculator's constructor would turn values into
    # arrays of its own and rejects unknown property names.
    calc.results = results
    atoms.calc = calc


def make_atoms(
    numbers: np.ndarray,
    positions: np.ndarray,
    cell: np.ndarray,
    pbc: np.ndarray,
    *,
    fixed: Optional[np.ndarray] = None,
    tags: Optional[np.ndarray] = None,
    energy: Optional[float] = None,
    forces: Optional[np.ndarray] = None,
    info: Optional[dict] = None,
    arrays: Optional[dict] = None,
) -> "ase.Atoms":
    """An ``ase.Atoms`` with a ``FixAtoms`` constraint for ``fixed`` ([N] bool), ``tags``
    ([N] int), ``energy``/``forces`` ([N, 3]) on a ``SinglePointCalculator``, and extra
    ``info`` entries and per-atom ``arrays``."""
    from ase import Atoms
    from ase.constraints import FixAtoms

    atoms = Atoms(numbers=numbers, positions=positions, cell=cell, pbc=pbc)
    if tags is not None:
        atoms.set_tags(np.asarray(tags, dtype=np.int64))
    if fixed is not None and np.any(fixed):
        atoms.set_constraint(FixAtoms(mask=np.asarray(fixed, dtype=bool)))
    for name, value in (arrays or {}).items():
        atoms.new_array(name, np.asarray(value))
    atoms.info.update(info or {})
    set_results(atoms, {"energy": energy, "forces": forces})
    return atoms


class LazyLmdb:
    """A read-only LMDB environment (no lock, no readahead: random access by many
    readers), opened on first use in each process and never pickled.

    After a fork (``DataLoader`` workers) the inherited environment is closed in the
    child before reopening: LMDB forbids using an environment across fork, and py-lmdb
    >= 3 refuses to open files it believes are already open in the process, a registry
    the child inherits. Closing the child's copy unmaps only the child's view.
    """

    def __init__(self, path: os.PathLike | str, subdir: bool):
        self.path = Path(path)
        self.subdir = subdir
        self._env: Any = None
        self._pid: Optional[int] = None

    def env(self) -> Any:
        """The environment of this process."""
        if self._env is not None and self._pid == os.getpid():
            return self._env
        import lmdb

        if self._env is not None:
            self._env.close()  # inherited through fork (see class docstring)
        self._env = lmdb.open(
            str(self.path), subdir=self.subdir, readonly=True, lock=False, readahead=False, meminit=False
        )
        self._pid = os.getpid()
        return self._env

    def get(self, key: bytes) -> Optional[bytes]:
        """The value under ``key`` (None if absent)."""
        with self.env().begin() as txn:
            return txn.get(key)

    def close(self) -> None:
        env, self._env = self._env, None
        if env is not None:
            env.close()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_env"] = state["_pid"] = None
        return state

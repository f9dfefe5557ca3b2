"""Datasets of atomic structures: open any supported file (or directory of shards) as a
streaming, validating ``torch.utils.data.Dataset`` of ``ase.Atoms``; write and convert.

Example::

    from torch.utils.data import DataLoader
    from spherical_channels.data import AtomicBatch, open_dataset

    ds = open_dataset("train.extxyz", energy_key="REF_energy", forces_key="REF_forces",
                      require_energy=True, require_forces=True)
    loader = DataLoader(ds, batch_size=8, shuffle=True, num_workers=2,
                        collate_fn=AtomicBatch.from_atoms)

Formats: see :data:`spherical_channels.data.formats.FORMATS` (extxyz, ASE ``.db``,
``.aselmdb``, legacy OC20 ``.lmdb``, which holds pickles and is opened only with
``trust_pickle=True``).

Reading never modifies the input (SQLite is opened read-only, LMDB without a lock file), and
a file that holds no structures (a 0-byte file included) is an error, not an empty dataset.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch.utils.data

from .formats import (
    DEFAULT_MAX_ATOMIC_NUMBER,
    DEFAULT_MIN_DISTANCE,
    FORMATS,
    DataError,
    FormatSpec,
    StructureReader,
    UnknownFormatError,
    check_structure,
    format_from_name,
    format_of_file,
    unknown_extension,
)
from .formats.common import located, set_results, stored_results
from .validation import MAX_ABS_ENERGY_PER_ATOM, MAX_ABS_FORCE

if TYPE_CHECKING:
    import ase

__all__ = [
    "DataError",
    "StructureDataset",
    "UnknownFormatError",
    "open_dataset",
    "validate_dataset",
    "write_dataset",
]

# An LMDB environment stored as a directory (lmdb's default layout) holds this file.
_LMDB_DATA_FILE = "data.mdb"
# The LMDB lock file written next to a subdir=False environment.
_LMDB_LOCK_SUFFIX = "-lock"


class StructureDataset(torch.utils.data.Dataset):
    """Structures of one or more files of one format, read and validated one at a time.

    ``ds[i]`` is an ``ase.Atoms`` with energy/forces (if present) on a
    ``SinglePointCalculator``, fixed atoms as a ``FixAtoms`` constraint, ``tags``, and
    the format's ``info`` / extra per-atom arrays; it is checked with
    :func:`~spherical_channels.data.formats.check_structure` (raising
    :class:`DataError`) unless ``validate=False``. Nothing but per-file indices is held in
    memory, and the dataset pickles without open handles, so ``DataLoader`` workers work.

    Build it with :func:`open_dataset`.
    """

    def __init__(
        self,
        path: Path,
        format: str,
        readers: list[StructureReader],
        *,
        energy_key: Optional[str] = None,
        forces_key: Optional[str] = None,
        require_energy: bool = False,
        require_forces: bool = False,
        max_atomic_number: int = DEFAULT_MAX_ATOMIC_NUMBER,
        min_distance: float = DEFAULT_MIN_DISTANCE,
        max_abs_force: Optional[float] = MAX_ABS_FORCE,
        max_abs_energy_per_atom: Optional[float] = MAX_ABS_ENERGY_PER_ATOM,
        validate: bool = True,
    ):
        self.path = Path(path)
        self.format = format
        self.energy_key = energy_key
        self.forces_key = forces_key
        self.require_energy = require_energy
        self.require_forces = require_forces
        self.max_atomic_number = max_atomic_number
        self.min_distance = min_distance
        self.max_abs_force = max_abs_force
        self.max_abs_energy_per_atom = max_abs_energy_per_atom
        self.validate = validate
        self._readers = list(readers)
        # _ends[k]: one past the last dataset index held by reader k.
        self._ends = np.cumsum([len(r) for r in self._readers]).tolist()

    @property
    def files(self) -> list[Path]:
        """The files (shards) making up the dataset, in dataset order."""
        return [r.path for r in self._readers]

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def _locate(self, index: int) -> tuple[StructureReader, int]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"{self.path}: structure index {index} out of range for {n} structures")
        index %= n
        k = bisect.bisect_right(self._ends, index)
        return self._readers[k], index - (self._ends[k - 1] if k else 0)

    def get(self, index: int, *, validate: Optional[bool] = None) -> "ase.Atoms":
        """Structure ``index``; ``validate`` overrides the dataset's setting."""
        index = int(index)
        reader, local = self._locate(index)
        try:
            atoms = reader.read(local)
            self._select_targets(atoms, reader.path, local)
            if self.validate if validate is None else validate:
                check_structure(
                    atoms,
                    reader.path,
                    local,
                    require_energy=self.require_energy,
                    require_forces=self.require_forces,
                    max_atomic_number=self.max_atomic_number,
                    min_distance=self.min_distance,
                    max_abs_force=self.max_abs_force,
                    max_abs_energy_per_atom=self.max_abs_energy_per_atom,
                )
        except DataError as err:
            if len(self._readers) > 1:
                raise _with_dataset_index(err, index % len(self)) from None
            raise
        return atoms

    def __getitem__(self, index: int) -> "ase.Atoms":
        return self.get(index)

    def __iter__(self) -> Iterator["ase.Atoms"]:
        return (self.get(i) for i in range(len(self)))

    def _select_targets(self, atoms: "ase.Atoms", path: Path, index: int) -> None:
        """Move ``info[energy_key]`` / ``arrays[forces_key]`` to the calculator results."""
        if self.energy_key is None and self.forces_key is None:
            return
        results = stored_results(atoms)
        for kind, key, required in (
            ("energy", self.energy_key, self.require_energy),
            ("forces", self.forces_key, self.require_forces),
        ):
            if key is None:
                continue
            value = _lookup(atoms, results, key)
            if value is None and required:
                raise located(
                    path,
                    index,
                    f"no {kind} under key {key!r} (required; info keys: {sorted(atoms.info)}, "
                    f"per-atom arrays: {sorted(atoms.arrays)})",
                )
            results[kind] = value
        set_results(atoms, results)

    def describe(self) -> dict[str, Any]:
        """Summary: path, format, files, count, and whether energy/forces are present
        (judged from the first and last structures, read without validation)."""
        samples = sorted({0, len(self) - 1}) if len(self) else []
        present = {"energy": bool(samples), "forces": bool(samples)}
        for i in samples:
            results = stored_results(self.get(i, validate=False))
            for kind in present:
                present[kind] &= results.get(kind) is not None
        return {
            "path": str(self.path),
            "format": self.format,
            "files": [str(f) for f in self.files],
            "count": len(self),
            "energy": present["energy"],
            "forces": present["forces"],
            "targets_judged_from": samples,
            "energy_key": self.energy_key,
            "forces_key": self.forces_key,
        }

    def close(self) -> None:
        """Close open handles (they reopen on the next access)."""
        for reader in self._readers:
            reader.close()

    def __repr__(self) -> str:
        return f"StructureDataset({str(self.path)!r}, format={self.format!r}, {len(self)} structures)"


def _lookup(atoms: "ase.Atoms", results: dict, key: str) -> Any:
    if key in atoms.info:
        return atoms.info[key]
    if key in atoms.arrays:
        return atoms.arrays[key]
    # e.g. energy_key="energy": ASE readers already moved it to the calculator
    return results.get(key)


def _with_dataset_index(err: DataError, index: int) -> DataError:
    """``err`` with "(dataset index i)" after its "<file>: structure <k>" prefix."""
    message = str(err)
    prefix = f"{err.path}: structure {err.index}"
    if err.index is not None and message.startswith(prefix):
        message = f"{prefix} (dataset index {index}){message[len(prefix):]}"
    else:
        message = f"{message} (dataset index {index})"
    return DataError(message, err.path, err.index)


def _resolve(path: Path, format: Optional[str]) -> tuple[FormatSpec, list[Path]]:
    """The format and the files of a dataset path (a file, or a directory of shards)."""
    spec = None if format is None else format_from_name(format)
    if path.is_file():
        spec = spec or format_of_file(path)
        if spec is None:
            raise unknown_extension(path)
        return spec, [path]
    if not path.is_dir():
        raise DataError(f"{path}: neither a regular file nor a directory", path)
    if (path / _LMDB_DATA_FILE).is_file():
        # An LMDB environment stored as a directory may hold anything: it is taken for a
        # legacy OC20 LMDB only when named so (*.lmdb) or when that format is asked for.
        if (spec is not None and spec.name == "oc20-lmdb") or (spec is None and format_of_file(path) is FORMATS["oc20-lmdb"]):
            return FORMATS["oc20-lmdb"], [path]
        if spec is None:
            raise DataError(
                f"{path}: directory holds an LMDB environment ({_LMDB_DATA_FILE}) whose format cannot be told "
                f"from its name; if it is a legacy OC20 LMDB, give the format (format='oc20-lmdb', "
                f"--input-format oc20-lmdb) or name the directory *.lmdb",
                path,
            )
    by_format: dict[str, list[Path]] = {}
    for child in sorted(path.iterdir()):
        child_spec = format_of_file(child)
        if child_spec is not None and (child.is_file() or (child / _LMDB_DATA_FILE).is_file()):
            by_format.setdefault(child_spec.name, []).append(child)
    if spec is not None:
        files = by_format.get(spec.name, [])
        if not files:
            raise DataError(f"{path}: directory holds no {spec.name} files ({', '.join(spec.extensions)})", path)
        return spec, files
    if not by_format:
        known = ", ".join(e for s in FORMATS.values() for e in s.extensions)
        raise UnknownFormatError(f"{path}: directory holds no structure files ({known})", path)
    if len(by_format) > 1:
        found = ", ".join(f"{len(v)} {k}" for k, v in by_format.items())
        raise UnknownFormatError(f"{path}: directory mixes formats ({found}); pass format=... to pick one", path)
    name, files = next(iter(by_format.items()))
    return FORMATS[name], files


def open_dataset(
    path: os.PathLike | str,
    format: Optional[str] = None,
    *,
    energy_key: Optional[str] = None,
    forces_key: Optional[str] = None,
    require_energy: bool = False,
    require_forces: bool = False,
    max_atomic_number: int = DEFAULT_MAX_ATOMIC_NUMBER,
    min_distance: float = DEFAULT_MIN_DISTANCE,
    max_abs_force: Optional[float] = MAX_ABS_FORCE,
    max_abs_energy_per_atom: Optional[float] = MAX_ABS_ENERGY_PER_ATOM,
    validate: bool = True,
    trust_pickle: bool = False,
) -> StructureDataset:
    """Open a structure file, or a directory of files of one format (concatenated in
    sorted name order), as a :class:`StructureDataset`.

    Args:
        path: ``.extxyz``/``.xyz``, ``.db``, ``.aselmdb``, ``.lmdb`` (legacy OC20, pickled:
            trusted files only, see ``trust_pickle``), or a directory of them. A directory
            holding ``data.mdb`` (an LMDB environment) is a legacy OC20 LMDB only if it is
            named ``*.lmdb`` or ``format`` says so.
        format: a name from :data:`~spherical_channels.data.formats.FORMATS` (or an
            alias); default: from the extension.
        energy_key / forces_key: read the energy from ``info[energy_key]`` and forces
            from ``arrays[forces_key]`` (extxyz columns, db key-value pairs / data)
            instead of the stored calculator results.
        require_energy / require_forces: a structure without them is an error.
        max_atomic_number: larger atomic numbers are "unknown element" errors.
        min_distance: atoms (or periodic images) this close (Angstrom) or closer are errors.
        max_abs_force / max_abs_energy_per_atom: plausibility bounds on force components
            (eV/A) and |energy| per atom (eV); None turns a bound off. Targets that are not
            finite in float32 are errors regardless.
        validate: check each structure on access (see ``check_structure``).
        trust_pickle: allow legacy OC20 LMDBs, whose entries are unpickled (running code
            from the file); without it opening one raises :class:`DataError` before anything
            is unpickled.

    Raises:
        DataError: unknown format, missing, unreadable or empty file (one that holds no
            structures), or a legacy OC20 LMDB without ``trust_pickle``.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory", path)
    spec, files = _resolve(path, format)
    for f in files:  # before any reader opens it: ASE would write its schema into an empty .db
        data_file = f / _LMDB_DATA_FILE if f.is_dir() else f
        if data_file.is_file() and data_file.stat().st_size == 0:
            raise DataError(f"{f}: holds no structures (the file is empty: 0 bytes)", f)
    readers = []
    try:
        for f in files:
            reader = spec.reader(f, trust_pickle=trust_pickle)
            readers.append(reader)
            if len(reader) == 0:
                raise DataError(f"{f}: holds no structures", f)
    except BaseException:
        for reader in readers:
            reader.close()
        raise
    return StructureDataset(
        path,
        spec.name,
        readers,
        energy_key=energy_key,
        forces_key=forces_key,
        require_energy=require_energy,
        require_forces=require_forces,
        max_atomic_number=max_atomic_number,
        min_distance=min_distance,
        max_abs_force=max_abs_force,
        max_abs_energy_per_atom=max_abs_energy_per_atom,
        validate=validate,
    )


def validate_dataset(dataset: StructureDataset, progress: bool = True) -> list[DataError]:
    """Check every structure of ``dataset``; the errors of all bad ones, in order."""
    from tqdm import tqdm

    errors = []
    for i in tqdm(range(len(dataset)), desc="check", unit="structure", disable=not progress):
        try:
            dataset.get(i, validate=True)
        except DataError as err:
            errors.append(err)
    return errors


def write_dataset(
    frames: Iterable["ase.Atoms"],
    path: os.PathLike | str,
    format: Optional[str] = None,
    *,
    overwrite: bool = False,
) -> int:
    """Write structures to a new file (extxyz, db or aselmdb), streaming; returns how
    many were written. Energy, forces, fixed atoms, tags, positions, cell, pbc and numbers
    round-trip exactly through :func:`open_dataset` (extxyz floats are written with
    ``repr``).

    The structures go to a temporary file next to ``path``, which replaces ``path`` only once
    all are written: on error (or with no structures) nothing is left behind and an existing
    ``path`` is kept, so ``frames`` may even be read from ``path`` itself.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        DataError: unknown or read-only format, or no structures to write (a file without
            structures could not be read back).
    """
    path = Path(path)
    spec = format_from_name(format) if format is not None else format_of_file(path)
    if spec is None:
        raise unknown_extension(path)
    if spec.open_writer is None:
        writable = ", ".join(s.name for s in FORMATS.values() if s.open_writer is not None)
        raise DataError(f"{path}: format {spec.name} is read-only here; write one of: {writable}", path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True / --overwrite to replace it)")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a file to write", path)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    _remove_output(partial)
    count = 0
    try:
        with spec.open_writer(partial, label=path) as writer:
            for atoms in frames:
                writer.write(atoms)
                count += 1
        if count == 0:
            raise DataError(f"{path}: no structures to write (not written)", path)
        os.replace(partial, path)
        lock = path.with_name(path.name + _LMDB_LOCK_SUFFIX)
        if lock.is_file():  # the lock file of the environment just replaced
            lock.unlink()
    finally:
        _remove_output(partial)
    return count


def _remove_output(path: Path) -> None:
    for p in (path, path.with_name(path.name + _LMDB_LOCK_SUFFIX)):
        if p.is_file():
            p.unlink()

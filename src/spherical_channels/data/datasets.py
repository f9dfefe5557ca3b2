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
``.aselmdb``, legacy OC20 ``.lmdb``).
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
    if (path / _LMDB_DATA_FILE).is_file() and (spec is None or spec.name == "oc20-lmdb"):
        return FORMATS["oc20-lmdb"], [path]
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
    validate: bool = True,
) -> StructureDataset:
    """Open a structure file, or a directory of files of one format (concatenated in
    sorted name order), as a :class:`StructureDataset`.

    Args:
        path: ``.extxyz``/``.xyz``, ``.db``, ``.aselmdb``, ``.lmdb`` (legacy OC20, pickled:
            trusted files only), or a directory of them.
        format: a name from :data:`~spherical_channels.data.formats.FORMATS` (or an
            alias); default: from the extension.
        energy_key / forces_key: read the energy from ``info[energy_key]`` and forces
            from ``arrays[forces_key]`` (extxyz columns, db key-value pairs / data)
            instead of the stored calculator results.
        require_energy / require_forces: a structure without them is an error.
        max_atomic_number: larger atomic numbers are "unknown element" errors.
        min_distance: atoms (or periodic images) closer than this (Angstrom) are errors.
        validate: check each structure on access (see ``check_structure``).

    Raises:
        DataError: unknown format, missing or unreadable file.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory", path)
    spec, files = _resolve(path, format)
    readers = [spec.open_reader(f) for f in files]
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
    ``repr``). On error the partial file is removed.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        DataError: unknown or read-only format.
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
    _remove_output(path)
    count = 0
    try:
        with spec.open_writer(path) as writer:
            for atoms in frames:
                writer.write(atoms)
                count += 1
    except BaseException:
        _remove_output(path)
        raise
    return count


def _remove_output(path: Path) -> None:
    for p in (path, path.with_name(path.name + _LMDB_LOCK_SUFFIX)):
        if p.is_file():
            p.unlink()

"""ASE databases: SQLite (``.db``) and LMDB (``.aselmdb``, from ``ase-db-backends``, the
format of fairchem's OMat/OMol/ODAC datasets). Rows are read by id, one per access.

Mapping between a row and an ``ase.Atoms``:

* numbers, positions, cell, pbc, tags, constraints and the stored calculator results
  (energy, forces, ...) are ASE's own row fields (float64 binary/JSON: exact);
* ``key_value_pairs`` and ``data`` entries go to ``atoms.info``, except
  ``data["arrays"]``, a dict of extra per-atom arrays, which goes to ``atoms.arrays``.

The writer does the reverse: ``info`` entries that ASE accepts as key-value pairs
(identifier keys, str/bool/int/float values) are stored as such, the rest in ``data``,
and per-atom arrays other than ASE's own in ``data["arrays"]``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from .common import LazyLmdb, located

if TYPE_CHECKING:
    import ase

__all__ = ["ARRAYS_KEY", "AseDbWriter", "AseLmdbReader", "AseSqliteReader", "row_to_atoms"]

#: Key of ``row.data`` holding extra per-atom arrays.
ARRAYS_KEY = "arrays"
# Per-atom arrays that an ASE row stores itself.
_ROW_ARRAYS = {"numbers", "positions", "tags", "momenta", "initial_magmoms", "initial_charges", "masses"}
# ASE database type name per backend.
_BACKENDS = ("db", "aselmdb")


class AseSqliteReader:
    """Rows of an ASE SQLite database (``.db``) in id order; ``read(k)`` fetches the k-th
    row by id. One read-only connection is held per process, opened lazily (3x faster than
    ASE's connection per query; ``DataLoader`` workers open their own, pickling drops it).
    The file is never written to."""

    def __init__(self, path: os.PathLike | str):
        self.path = Path(path)
        self._db: Any = None
        self._pid: Optional[int] = None
        try:
            self._ids = [row.id for row in self._connect().select(include_data=False, columns=["id"])]
        except Exception as err:  # sqlite3.DatabaseError and ASE schema errors share no base
            raise located(self.path, None, f"cannot open as an ASE SQLite database: {err}") from None
        self.close()  # reopened lazily, after any fork

    def _connect(self) -> Any:
        if self._db is not None and self._pid == os.getpid():
            return self._db
        import sqlite3

        from ase.db.sqlite import SQLite3Database

        # Read-only at the SQLite level: ASE's own connection would write its schema into any
        # SQLite file without one (an empty file included), so reading must not go through it.
        uri = self.path.resolve().as_uri() + "?mode=ro"
        probe = sqlite3.connect(uri, uri=True)
        try:
            has_table = probe.execute("SELECT COUNT(*) FROM sqlite_master WHERE name='systems'").fetchone()[0]
        finally:
            probe.close()
        if not has_table:
            raise ValueError("no 'systems' table: not an ASE database")
        db = SQLite3Database(str(self.path), use_lock_file=False)
        db._connect = lambda: sqlite3.connect(uri, uri=True, timeout=20)
        db.__enter__()  # the database's context holds one connection until close()
        self._db, self._pid = db, os.getpid()
        return db

    def __len__(self) -> int:
        return len(self._ids)

    def read(self, index: int) -> "ase.Atoms":
        row_id = self._ids[index]
        try:
            row = self._connect().get(id=row_id)
        except Exception as err:  # a corrupt row: sqlite3 or JSON errors
            raise located(self.path, index, f"cannot read row id {row_id}: {err}") from None
        return row_to_atoms(row)

    def close(self) -> None:
        db, self._db = self._db, None
        if db is not None and self._pid == os.getpid():
            db.__exit__(None, None, None)  # a connection inherited through fork is dropped, not used

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_db": None, "_pid": None}


class AseLmdbReader:
    """Rows of an ASE LMDB database (``.aselmdb``) in id order.

    Reads the environment directly (read-only, no lock, no readahead, reopened per
    process: see :class:`~.common.LazyLmdb`) and decodes rows with ase-db-backends'
    own functions. ``LMDBDatabase`` itself is not used for reading because after a fork
    it opens the environment again without closing the inherited one, which py-lmdb >= 3
    refuses ("already open in this process") in ``DataLoader`` workers.
    """

    def __init__(self, path: os.PathLike | str):
        self.path = Path(path)
        self._lmdb = LazyLmdb(self.path, subdir=False)
        try:
            nextid = self._decode(self._lmdb.get(b"nextid")) or 1
            deleted = set(self._decode(self._lmdb.get(b"deleted_ids")) or [])
        except Exception as err:  # lmdb.Error, zlib.error, JSON errors
            raise located(self.path, None, f"cannot open as an ASE LMDB database: {err}") from None
        # Same rule as LMDBDatabase._load_ids: ids 1..nextid-1 minus deleted ones.
        self._ids = [i for i in range(1, int(nextid)) if i not in deleted]
        self._lmdb.close()  # reopened lazily, after any fork

    @staticmethod
    def _decode(raw: Optional[bytes]) -> Any:
        from ase_db_backends.aselmdb import decode_bytestream

        return None if raw is None else decode_bytestream(raw, decompress=True, json_decode=True)

    def __len__(self) -> int:
        return len(self._ids)

    def read(self, index: int) -> "ase.Atoms":
        from ase.calculators.calculator import all_properties
        from ase.db.row import AtomsRow

        row_id = self._ids[index]
        try:
            dct = self._decode(self._lmdb.get(f"{row_id}".encode("ascii")))
        except Exception as err:
            raise located(self.path, index, f"cannot decode row id {row_id}: {err}") from None
        if dct is None:
            raise located(self.path, index, f"row id {row_id} is missing")
        # As LMDBDatabase._get_row: calculator properties stored as lists become arrays.
        for key in all_properties:
            if isinstance(dct.get(key), list):
                dct[key] = np.array(dct[key])
        dct["id"] = row_id
        return row_to_atoms(AtomsRow(dct))

    def close(self) -> None:
        self._lmdb.close()


def row_to_atoms(row: Any) -> "ase.Atoms":
    """An ASE database row as ``ase.Atoms`` (see the module docstring for the mapping)."""
    atoms = row.toatoms()
    atoms.info.update(row.key_value_pairs)
    data = dict(row.get("data") or {})
    for name, value in (data.pop(ARRAYS_KEY, None) or {}).items():
        atoms.new_array(name, np.asarray(value))
    atoms.info.update(data)
    return atoms


def _is_key_value_pair(key: str, value: Any) -> bool:
    """Whether ASE stores ``key: value`` as a (searchable) key-value pair without complaint;
    keys it warns about (ones that read as chemical formulas) go to ``data`` instead."""
    import warnings

    from ase.db.core import check

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            check({key: value})
        except (ValueError, TypeError):
            return False
    return not caught


class AseDbWriter:
    """Writes structures to a new ASE database (``backend`` "db" or "aselmdb"), all in
    one transaction committed on close."""

    def __init__(self, path: os.PathLike | str, backend: str, *, label: Optional[os.PathLike | str] = None):
        import ase.db

        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        self.path = Path(path)
        self.label = self.path if label is None else Path(label)  # the name messages give
        self._db = ase.db.connect(str(self.path), type=backend, append=False, use_lock_file=False)
        self._db.__enter__()

    def write(self, atoms: "ase.Atoms") -> None:
        key_value_pairs, data = {}, {}
        for key, value in atoms.info.items():
            if isinstance(value, np.generic):
                value = value.item()
            if _is_key_value_pair(key, value):
                key_value_pairs[key] = value
            else:
                data[key] = value
        arrays = {k: np.asarray(v) for k, v in atoms.arrays.items() if k not in _ROW_ARRAYS}
        if arrays:
            data[ARRAYS_KEY] = arrays
        self._db.write(atoms, key_value_pairs=key_value_pairs, data=data)

    def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            db.__exit__(None, None, None)

    def __enter__(self) -> "AseDbWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

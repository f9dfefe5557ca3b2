"""Legacy OC20 LMDBs (S2EF / IS2RE / IS2RS, as released for the OCP models): each
entry is a **pickled** ``torch_geometric.data.Data``.

.. warning::
   Reading these files unpickles Python objects, which runs code chosen by whoever
   wrote the file. They are opened only with an explicit opt-in (``trust_pickle=True``,
   ``--trust-pickle`` on the command line); without it, opening one raises a
   :class:`DataError` that says what the file holds, before anything is unpickled (the
   entries' pickle opcodes are only inspected, never executed). With the opt-in an
   :class:`UntrustedPickleWarning` is issued the first time each file is opened. Only open
   LMDBs you trust (e.g. downloaded from the OC20 release over HTTPS); for data you do not
   control, convert it once (``scn data convert --trust-pickle in.lmdb out.aselmdb``) on a
   trusted machine and share the ``.aselmdb`` (plain JSON) instead.

Keys are ASCII integers ``b"0"``, ``b"1"``, ..., optionally with ``b"length"`` holding
the pickled entry count. Fields used: ``pos`` [N, 3], ``atomic_numbers`` [N],
``cell`` [1, 3, 3] (periodic along all axes, as in OC20), ``natoms``, ``tags`` [N],
``fixed`` [N], energy ``y`` or ``energy``, forces ``force`` or ``forces`` [N, 3];
IS2RE/IS2RS ``y_relaxed`` becomes ``info["relaxed_energy"]`` and ``pos_relaxed``
``arrays["relaxed_positions"]``. Other scalar fields (``sid``, ``fid``, ``y_init``, ...)
go to ``info`` and other per-atom fields to ``arrays`` under their own names;
precomputed graph fields are dropped.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...security import UntrustedPickleWarning
from .common import DataError, LazyLmdb, located, make_atoms

if TYPE_CHECKING:
    import ase

__all__ = ["Oc20LmdbReader", "UntrustedPickleWarning", "data_fields", "describe_lmdb", "pickle_globals", "untrusted_error"]

_LENGTH_KEY = b"length"
# Field names, first match wins.
_ENERGY_FIELDS = ("y", "energy")
_FORCES_FIELDS = ("force", "forces")
_INFO_RENAMES = {"y_relaxed": "relaxed_energy"}
_ARRAY_RENAMES = {"pos_relaxed": "relaxed_positions"}
# Fields consumed explicitly or dropped (precomputed graphs are rebuilt by the model).
_HANDLED = {"pos", "atomic_numbers", "cell", "pbc", "natoms", "tags", "fixed", *_ENERGY_FIELDS, *_FORCES_FIELDS}
_DROPPED = {"edge_index", "cell_offsets", "distances", "neighbors", "offsets", "nads"}

_SECURITY_NOTE = (
    "legacy OC20 LMDBs hold pickled Python objects and reading them runs code from the "
    "file: only open files you trust"
)
# Files already warned about in this process.
_WARNED: set[str] = set()


def _require_torch_geometric(path: Path) -> None:
    try:
        import torch_geometric  # noqa: F401  (unpickling Data objects imports it)
    except ImportError:
        raise DataError(
            f"{path}: reading legacy OC20 LMDBs needs torch_geometric "
            f"(pip install 'spherical-channels[oc20]'); note that {_SECURITY_NOTE}",
            path,
        ) from None


def pickle_globals(raw: bytes, limit: int = 6) -> list[str]:
    """The importable names (``module.name``) a pickle would import when loaded, in order of
    first use, at most ``limit``; found by walking its opcodes with :mod:`pickletools`,
    which executes nothing. A pickle that cannot be parsed yields what was found before."""
    found: list[str] = []
    memo: dict[int, object] = {}
    recent: list[object] = []  # what the last opcodes pushed (strings or None)
    try:
        for op, arg, _ in pickletools.genops(raw):
            name = op.name
            if name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
                memo[len(memo) if name == "MEMOIZE" else int(arg)] = recent[-1] if recent else None
                continue
            if name in ("GET", "BINGET", "LONG_BINGET"):
                recent.append(memo.get(int(arg)))
            elif name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                # protocols < 3 name the builtins module as Python 2 did
                found.append(f"{'builtins' if module == '__builtin__' else module}.{attr}")
                recent.append(None)
            elif name == "STACK_GLOBAL":
                module, attr = (recent[-2], recent[-1]) if len(recent) >= 2 else (None, None)
                found.append(f"{module}.{attr}" if isinstance(module, str) and isinstance(attr, str) else "?")
                recent.append(None)
            elif "UNICODE" in name or "STRING" in name:
                recent.append(arg if isinstance(arg, str) else None)
            else:
                recent.append(None)
            del recent[:-2]
            if len(dict.fromkeys(found)) >= limit:
                break
    except Exception:  # noqa: BLE001 - malformed pickles are described as far as they parse
        pass
    return list(dict.fromkeys(found))[:limit]


def describe_lmdb(path: os.PathLike | str) -> str:
    """What an LMDB environment holds, read without unpickling anything: the number of
    entries and what its first entry would import. Raises :class:`DataError` if it is not an
    LMDB environment."""
    path = Path(path)
    store = LazyLmdb(path, subdir=path.is_dir())
    try:
        with store.env().begin() as txn:
            entries = int(txn.stat()["entries"]) - (txn.get(_LENGTH_KEY) is not None)
            raw = txn.get(b"0")
            if raw is None:
                with txn.cursor() as cursor:
                    raw = cursor.value() if cursor.first() else None
    except Exception as err:  # lmdb.Error
        raise located(path, None, f"cannot open as an LMDB environment: {err}") from None
    finally:
        store.close()  # py-lmdb refuses to open an environment twice in one process
    if raw is None:
        return f"{entries} entries"
    names = pickle_globals(raw)
    if names:
        return f"{entries} entries; the first is a pickle that would import {', '.join(names)}"
    if raw[:1] == b"\x80":  # the protocol opcode of every pickle since protocol 2
        return f"{entries} entries; the first is a pickle"
    return f"{entries} entries; the first does not look like a pickle (is it another format, e.g. an aselmdb?)"


def untrusted_error(path: os.PathLike | str) -> DataError:
    """The error for opening a legacy OC20 LMDB without ``trust_pickle`` (nothing unpickled)."""
    path = Path(path)
    target = path.with_suffix(".aselmdb").name
    return located(
        path,
        None,
        f"a legacy OC20 LMDB ({describe_lmdb(path)}): its entries are pickled Python objects, and "
        f"unpickling runs code chosen by whoever wrote the file, so it is not opened without your "
        f"opt-in. If you trust the file, pass trust_pickle=True (Python) or --trust-pickle (command "
        f"line). Better: convert it once on a trusted machine (scn data convert --trust-pickle {path} "
        f"{target}) and use the .aselmdb, which holds no code",
    )


class Oc20LmdbReader:
    """Entries of one legacy OC20 LMDB: a ``.lmdb`` file, or a directory holding
    ``data.mdb``. The environment is opened read-only, without lock or readahead,
    lazily in each process (pickling the reader drops it).

    ``trust_pickle`` must be True (entries are unpickled, which runs code from the file);
    without it :func:`untrusted_error` is raised before anything is unpickled.
    """

    def __init__(self, path: os.PathLike | str, *, trust_pickle: bool = False):
        self.path = Path(path)
        if not trust_pickle:
            raise untrusted_error(self.path)
        _require_torch_geometric(self.path)
        if str(self.path) not in _WARNED:
            _WARNED.add(str(self.path))
            warnings.warn(f"{self.path}: {_SECURITY_NOTE}", UntrustedPickleWarning, stacklevel=4)
        self._lmdb = LazyLmdb(self.path, subdir=self.path.is_dir())
        try:
            raw = self._lmdb.get(_LENGTH_KEY)
            if raw is not None:
                self._length = int(pickle.loads(raw))
            else:
                with self._lmdb.env().begin() as txn:
                    self._length = int(txn.stat()["entries"])
        except Exception as err:  # lmdb.Error, unpickling errors
            self._lmdb.close()
            raise located(self.path, None, f"cannot open as an OC20 LMDB: {err}") from None
        self._lmdb.close()  # reopened lazily, after any fork

    def __len__(self) -> int:
        return self._length

    def read(self, index: int) -> "ase.Atoms":
        key = f"{index}".encode("ascii")
        raw = self._lmdb.get(key)
        if raw is None:
            raise located(self.path, index, f"no entry under key {key!r}")
        try:
            fields = data_fields(pickle.loads(raw))
        except Exception as err:
            raise located(self.path, index, f"cannot unpickle entry: {err}") from None
        return _fields_to_atoms(fields, self.path, index)

    def close(self) -> None:
        self._lmdb.close()


def data_fields(data: Any) -> dict:
    """The fields of a torch_geometric ``Data`` as a dict, for both layouts: PyG >= 2
    keeps them in ``_store``; objects pickled by PyG 1.x (most OC20 releases) have them
    as plain instance attributes, which PyG 2 cannot access through ``getattr``."""
    if isinstance(data, dict):
        return {k: v for k, v in data.items() if v is not None}
    state = vars(data)
    store = state.get("_store")
    if store is not None:
        return {k: store[k] for k in store.keys() if store[k] is not None}
    return {k: v for k, v in state.items() if not k.startswith("_") and v is not None}


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _first(fields: dict, names: tuple[str, ...]) -> Any:
    return next((fields[n] for n in names if n in fields), None)


def _fields_to_atoms(fields: dict, path: Path, index: int) -> "ase.Atoms":
    def fail(what: str) -> DataError:
        return located(path, index, what)

    for name in ("pos", "atomic_numbers"):
        if name not in fields:
            raise fail(f"entry has no {name!r} field (fields: {sorted(fields)})")
    positions = _numpy(fields["pos"]).astype(np.float64)
    n = positions.shape[0] if positions.ndim == 2 else -1
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise fail(f"pos has shape {positions.shape}, expected (N, 3)")
    numbers_f = _numpy(fields["atomic_numbers"]).reshape(-1)
    if numbers_f.shape != (n,):
        raise fail(f"atomic_numbers has {numbers_f.size} entries for {n} atoms")
    numbers = np.rint(numbers_f).astype(np.int64)  # OC20 stores them as floats
    if "natoms" in fields and int(_numpy(fields["natoms"]).reshape(-1)[0]) != n:
        raise fail(f"natoms = {int(_numpy(fields['natoms']).reshape(-1)[0])} but pos has {n} rows")
    if "cell" in fields:
        cell = _numpy(fields["cell"]).astype(np.float64)
        if cell.size != 9:
            raise fail(f"cell has shape {cell.shape}, expected (1, 3, 3)")
        cell = cell.reshape(3, 3)
        pbc = _numpy(fields["pbc"]).astype(bool).reshape(3) if "pbc" in fields else np.ones(3, bool)
    else:
        cell, pbc = np.zeros((3, 3)), np.zeros(3, bool)

    energy = _first(fields, _ENERGY_FIELDS)
    if energy is not None:
        energy = _numpy(energy).astype(np.float64).reshape(-1)
        if energy.size != 1:
            raise fail(f"energy has {energy.size} entries, expected one")
        energy = float(energy[0])
    forces = _first(fields, _FORCES_FIELDS)
    per_atom = {}
    for name, dtype in (("fixed", bool), ("tags", np.int64)):
        if name in fields:
            per_atom[name] = _numpy(fields[name]).reshape(-1).astype(dtype)
            if per_atom[name].shape != (n,):
                raise fail(f"{name} has {per_atom[name].size} entries for {n} atoms")
    info, arrays = {}, {}
    for name, value in fields.items():
        if name in _HANDLED or name in _DROPPED:
            continue
        if name in _ARRAY_RENAMES:
            arrays[_ARRAY_RENAMES[name]] = _numpy(value).astype(np.float64)
            continue
        key = _INFO_RENAMES.get(name, name)
        if not hasattr(value, "shape") and not isinstance(value, np.ndarray):
            info[key] = value  # str, int, float
            continue
        array = _numpy(value)
        if array.size == 1 and (n != 1 or array.ndim == 0):
            info[key] = array.reshape(()).item()
        elif array.ndim >= 1 and array.shape[0] == n:
            arrays[key] = array
    return make_atoms(
        numbers,
        positions,
        cell,
        pbc,
        fixed=per_atom.get("fixed"),
        tags=per_atom.get("tags"),
        energy=energy,
        forces=None if forces is None else _numpy(forces).astype(np.float64),
        info=info,
        arrays=arrays,
    )

"""Extended XYZ: a streaming reader (byte-offset index, one frame parsed per access)
and a writer whose floats round-trip float64 exactly.

ASE's own extxyz writer prints per-atom floats (positions, forces) with ``%16.8f``,
i.e. to 1e-8 absolute, so float64 values do not survive a write/read cycle; cell,
energy and other ``info`` floats it prints with ``str`` (shortest round-trip repr),
which is exact. :class:`ExtxyzWriter` prints every float with ``repr`` (the shortest
string that reads back to the same float64) and is read by ASE and any extxyz reader.
"""

from __future__ import annotations

import io
import json
import os
import re
import warnings
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from .common import located, stored_results

if TYPE_CHECKING:
    import ase

__all__ = ["ExtxyzReader", "ExtxyzWriter", "index_frames", "parse_frame"]

# Keys ASE derives from the comment line itself; never copied from atoms.info.
_RESERVED_INFO = {"Lattice", "Properties", "pbc"}
# Per-atom arrays written from the Atoms object itself, not from atoms.arrays.
_SKIPPED_ARRAYS = {"numbers", "positions", "species", "pos", "move_mask"}
# extxyz property type letter per numpy dtype kind.
# how extxyz splits an info value into parts, and the words it reads as booleans
_INFO_PARTS = re.compile(r"[^\s,]+")
_BOOL_WORDS = frozenset({"T", "F", "true", "false", "True", "False", "TRUE", "FALSE"})
_TYPE_LETTER = {"f": "R", "i": "I", "u": "I", "b": "L", "U": "S", "S": "S", "O": "S"}


def index_frames(path: os.PathLike | str) -> np.ndarray:
    """[S + 1] int64 byte offsets: frame ``k`` is ``bytes[offsets[k]:offsets[k + 1]]``.

    One pass over the lines without parsing them: each frame is an atom-count line, a
    comment line and that many atom lines. Blank lines between frames are skipped.
    """
    path = Path(path)
    offsets: list[int] = []
    pos = 0
    line_no = 0
    with open(path, "rb") as fh:
        while True:
            line = fh.readline()
            if not line:
                break
            line_no += 1
            if not line.strip():
                pos += len(line)
                continue
            try:
                natoms = int(line)
            except ValueError:
                raise located(
                    path, len(offsets), f"line {line_no}: expected the number of atoms, got {line[:60]!r}"
                ) from None
            if natoms < 0:
                raise located(path, len(offsets), f"line {line_no}: negative number of atoms ({natoms})")
            # islice over the file object reads the comment and atom lines in C.
            lines = list(islice(fh, natoms + 1))
            if len(lines) < natoms + 1:
                raise located(
                    path,
                    len(offsets),
                    f"truncated: the frame starting on line {line_no} declares {natoms} atoms "
                    f"but the file ends after {max(len(lines) - 1, 0)}",
                )
            offsets.append(pos)
            pos += len(line) + sum(map(len, lines))
            line_no += natoms + 1
    offsets.append(pos)
    return np.asarray(offsets, dtype=np.int64)


def parse_frame(text: str) -> "ase.Atoms":
    """Parse the text of one extxyz frame (stored energy/forces end up on a
    ``SinglePointCalculator``, other comment-line keys in ``info``)."""
    from ase.io.extxyz import read_xyz

    return next(read_xyz(io.StringIO(text), index=0))


class ExtxyzReader:
    """Frames of one extxyz (or plain xyz) file, parsed one at a time on access.

    Opening builds the byte-offset index (:func:`index_frames`, kept in memory: 8 bytes
    per frame); ``read(k)`` seeks to frame ``k``, reads its bytes and parses them alone.
    """

    def __init__(self, path: os.PathLike | str):
        self.path = Path(path)
        self._offsets = index_frames(self.path)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def read(self, index: int) -> "ase.Atoms":
        start, end = int(self._offsets[index]), int(self._offsets[index + 1])
        # Open per access: nothing to reopen in DataLoader workers, and the cost
        # (~10 us) is small next to parsing.
        with open(self.path, "rb") as fh:
            fh.seek(start)
            raw = fh.read(end - start)
        try:
            return parse_frame(raw.decode("utf-8"))
        except (ValueError, KeyError, IndexError, StopIteration, UnicodeDecodeError, OSError) as err:
            raise located(self.path, index, f"cannot parse frame: {err}") from None

    def close(self) -> None:
        pass


def _format_value(value: Any) -> str:
    """One per-atom value as extxyz text; floats as their shortest exact repr."""
    if isinstance(value, (bool, np.bool_)):
        return "T" if value else "F"
    if isinstance(value, float):
        return repr(value)
    return str(value)


class ExtxyzWriter:
    """Writes structures to a new extxyz file, one frame per :meth:`write`.

    Writes symbols, positions, a ``move_mask`` for ``FixAtoms`` constraints, ``tags``
    and other per-atom arrays, the stored calculator results (energy and other
    per-structure results on the comment line, forces as a column), ``info`` and pbc.
    Constraints other than ``FixAtoms`` are dropped with a warning.
    """

    def __init__(self, path: os.PathLike | str, *, label: Optional[os.PathLike | str] = None):
        self.path = Path(path)
        self.label = self.path if label is None else Path(label)  # the name warnings give
        self._fh: Optional[io.TextIOBase] = open(self.path, "w", encoding="utf-8")
        self._warned: set[str] = set()

    def write(self, atoms: "ase.Atoms") -> None:
        from ase.io.extxyz import key_val_dict_to_str

        n = len(atoms)
        columns: list[tuple[str, np.ndarray]] = [("species", np.asarray(atoms.get_chemical_symbols(), dtype=str))]
        columns.append(("pos", np.asarray(atoms.positions, dtype=np.float64)))
        fixed = self._fixed_mask(atoms)
        if fixed is not None:
            columns.append(("move_mask", ~fixed))
        for name, value in atoms.arrays.items():
            if name not in _SKIPPED_ARRAYS:
                columns.append((name, np.asarray(value)))
        info = {k: _string_safe(v) for k, v in atoms.info.items() if k not in _RESERVED_INFO}
        for name, value in stored_results(atoms).items():
            value = np.asarray(value)
            if value.ndim >= 1 and value.shape[0] == n and name not in ("stress", "dipole"):
                columns.append((name, value))
            elif name == "stress" and value.shape == (6,):
                info[name] = _voigt_to_full(value)
            else:
                info[name] = value
        props, blocks = self._columns(columns, n)
        header = [f"Properties={props}"]
        if atoms.cell.any():
            lattice = " ".join(repr(float(x)) for x in np.asarray(atoms.cell.array).reshape(9))
            header.insert(0, f'Lattice="{lattice}"')
        info["pbc"] = np.asarray(atoms.pbc, dtype=bool)
        header.append(key_val_dict_to_str(info))
        lines = [" ".join(row) for row in zip(*blocks)] if n else []
        assert self._fh is not None, "writer is closed"
        self._fh.write(f"{n}\n{' '.join(h for h in header if h)}\n")
        self._fh.writelines(line + "\n" for line in lines)
        self._fh.flush()  # a process killed outright (SIGKILL, OOM) keeps every finished frame

    def _fixed_mask(self, atoms: "ase.Atoms") -> Optional[np.ndarray]:
        from ase.constraints import FixAtoms

        fixed = np.zeros(len(atoms), dtype=bool)
        for constraint in atoms.constraints:
            if isinstance(constraint, FixAtoms):
                fixed[constraint.get_indices()] = True
            else:
                self._warn_once(f"extxyz output keeps only FixAtoms constraints; dropping {type(constraint).__name__}")
        return fixed if fixed.any() else None

    def _columns(self, columns: list[tuple[str, np.ndarray]], n: int) -> tuple[str, list[list[str]]]:
        """Properties string and, per output column, its n formatted values."""
        props, blocks = [], []
        for name, value in columns:
            letter = _TYPE_LETTER.get(value.dtype.kind)
            # the width from the shape, not the size: a structure without atoms has columns too
            width = int(np.prod(value.shape[1:])) if value.ndim >= 1 and value.shape[0] == n else 0
            if letter is None or value.ndim > 2 or ":" in name or " " in name or width == 0:
                self._warn_once(f"extxyz output cannot hold per-atom array {name!r} ({value.dtype}, {value.shape}); dropped")
                continue
            flat = value.reshape(n, width)
            if letter == "R":
                flat = flat.astype(np.float64)
            props.append(f"{name}:{letter}:{flat.shape[1]}")
            for c in range(flat.shape[1]):
                blocks.append([_format_value(v) for v in flat[:, c].tolist()])
        return ":".join(props), blocks

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(f"{self.label}: {message}", stacklevel=3)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "ExtxyzWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _reads_back_as_str(value: str) -> bool:
    """Whether extxyz reads the info string ``value`` back as a string (not a number, a
    boolean or an array of them)."""
    parts = _INFO_PARTS.findall(value)
    try:
        np.array(parts, dtype=float)
        return False
    except ValueError:
        return not all(part in _BOOL_WORDS for part in parts)


def _string_safe(value: Any) -> Any:
    """Strings extxyz would turn into numbers or booleans (a facet "111") as JSON strings, which
    read back as the same ``str``."""
    if isinstance(value, str) and not _reads_back_as_str(value):
        return "_JSON " + json.dumps(value)
    return value


def _voigt_to_full(v: np.ndarray) -> np.ndarray:
    xx, yy, zz, yz, xz, xy = v
    return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])

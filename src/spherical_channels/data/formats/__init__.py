"""Structure file formats: one module per format, each with a streaming reader (and a
writer where the format is writable), registered here by name and file extension.

``spherical_channels.data.datasets`` is the front door (``open_dataset``,
``write_dataset``); use these modules directly only for format-specific details.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional

from .asedb import AseDbWriter, AseLmdbReader, AseSqliteReader
from .checks import DEFAULT_MAX_ATOMIC_NUMBER, DEFAULT_MIN_DISTANCE, check_structure
from .common import DataError, StructureReader, StructureWriter, UnknownFormatError
from .extxyz import ExtxyzReader, ExtxyzWriter
from .oc20lmdb import Oc20LmdbReader, UntrustedPickleWarning

__all__ = [
    "ALIASES",
    "DEFAULT_MAX_ATOMIC_NUMBER",
    "DEFAULT_MIN_DISTANCE",
    "DataError",
    "FORMATS",
    "FormatSpec",
    "StructureReader",
    "StructureWriter",
    "UnknownFormatError",
    "UntrustedPickleWarning",
    "check_structure",
    "format_from_name",
    "format_of_file",
]


@dataclass(frozen=True)
class FormatSpec:
    """A registered format: canonical ``name``, file ``extensions`` (lower case, with
    the dot), a one-line ``description``, and how to open a reader / writer for one
    file (``open_writer`` is None for read-only formats). ``pickled`` formats run code from
    the file when read: their ``open_reader`` takes ``trust_pickle=`` and refuses without it."""

    name: str
    extensions: tuple[str, ...]
    description: str
    open_reader: Callable[..., StructureReader]
    open_writer: Optional[Callable[..., StructureWriter]] = None  # (path, *, label=None): label names it in messages
    pickled: bool = False

    def reader(self, path: Path, *, trust_pickle: bool = False) -> StructureReader:
        """A reader for one file (``trust_pickle`` is passed to pickled formats only)."""
        return self.open_reader(path, trust_pickle=trust_pickle) if self.pickled else self.open_reader(path)


#: Registered formats by canonical name, in the order help texts list them.
FORMATS: dict[str, FormatSpec] = {
    spec.name: spec
    for spec in (
        FormatSpec("extxyz", (".extxyz", ".xyz"), "extended XYZ (ASE, MACE, NequIP)", ExtxyzReader, ExtxyzWriter),
        FormatSpec(
            "db", (".db",), "ASE SQLite database", AseSqliteReader, partial(AseDbWriter, backend="db")
        ),
        FormatSpec(
            "aselmdb",
            (".aselmdb",),
            "ASE LMDB database (ase-db-backends; fairchem OMat/OMol/ODAC)",
            AseLmdbReader,
            partial(AseDbWriter, backend="aselmdb"),
        ),
        FormatSpec(
            "oc20-lmdb",
            (".lmdb",),
            "legacy OC20 LMDB of pickled torch_geometric Data (read only; trusted files only, with trust_pickle)",
            Oc20LmdbReader,
            pickled=True,
        ),
    )
}

#: Other accepted spellings of format names.
ALIASES = {"xyz": "extxyz", "sqlite": "db", "lmdb": "oc20-lmdb", "oc20": "oc20-lmdb"}


def _known() -> str:
    return "; ".join(f"{s.name} ({', '.join(s.extensions)})" for s in FORMATS.values())


def format_from_name(name: str) -> FormatSpec:
    """The format called ``name`` (canonical or alias, case-insensitive); DataError
    listing the known formats otherwise."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in FORMATS:
        raise UnknownFormatError(f"unknown format {name!r}; known formats: {_known()}")
    return FORMATS[key]


def format_of_file(path: os.PathLike | str) -> Optional[FormatSpec]:
    """The format a file name's extension stands for, or None."""
    suffix = Path(path).suffix.lower()
    return next((s for s in FORMATS.values() if suffix in s.extensions), None)


def unknown_extension(path: os.PathLike | str) -> UnknownFormatError:
    """The error for a file whose format cannot be told from its name."""
    return UnknownFormatError(
        f"{path}: cannot tell the format from the extension {Path(path).suffix!r}; "
        f"give it explicitly. Known formats: {_known()}",
        path,
    )

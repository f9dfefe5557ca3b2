"""Helpers shared by the subcommands: opening structure files, finding data splits."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DataItem", "OPTIMIZER_NAMES", "TRUST_PICKLE_HELP", "add_trust_pickle_argument", "data_items", "open_structures"]

#: Help text of ``--trust-pickle`` (the same on every command).
TRUST_PICKLE_HELP = (
    "allow files that need full unpickling (some official OC20 checkpoints, legacy OC20 LMDBs); "
    "unpickling runs code from the file: use it only for files you trust"
)


def add_trust_pickle_argument(parser: Any) -> None:
    """Add ``--trust-pickle`` to a command that reads checkpoints or data sets."""
    parser.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE_HELP)

#: ASE optimisers the CLI offers (``simulation.relax.OPTIMIZERS``; named here so that building
#: the parser does not import torch).
OPTIMIZER_NAMES = ("BFGS", "BFGSLineSearch", "FIRE", "LBFGS")


def open_structures(path: str | Path, trust_pickle: bool = False) -> Any:
    """A random-access sequence of ``ase.Atoms`` from any data set format this package reads,
    or, failing that, from any file ASE reads. ``trust_pickle`` allows legacy OC20 LMDBs."""
    from ..data.datasets import UnknownFormatError, open_dataset

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        return open_dataset(path, trust_pickle=trust_pickle)
    except UnknownFormatError:  # not one of the data set formats: let ASE try
        pass
    from ase.io import read

    frames = read(path, ":")
    if not frames:
        raise ValueError(f"{path} holds no structures")
    return frames


@dataclass
class DataItem:
    """One thing to evaluate: a split's S2EF frames or its initial structures to relax."""

    name: str
    task: str  # "s2ef" or "relax"
    path: Path
    data: Any = field(default=None, repr=False)  # the structures, once opened
    trust_pickle: bool = False

    def open(self) -> Any:
        """The structures of ``path`` (opened once: a file given directly was already opened
        to tell its task)."""
        if self.data is None:
            self.data = open_structures(self.path, trust_pickle=self.trust_pickle)
        return self.data


def data_items(paths: list[str], trust_pickle: bool = False) -> list[DataItem]:
    """Expand the given paths: a directory written by ``scn data generate`` becomes its splits
    (metadata.json); a file is S2EF data, or relaxation data if it carries relaxed targets."""
    items: list[DataItem] = []
    for raw in paths:
        path = Path(raw)
        meta = path / "metadata.json"
        if path.is_dir() and meta.exists():
            for split, info in json.loads(meta.read_text())["splits"].items():
                for task, key in (("s2ef", "s2ef"), ("relax", "is2re")):
                    if info.get(key) and (path / info[key]).exists():
                        items.append(DataItem(split, task, path / info[key], trust_pickle=trust_pickle))
            continue
        if not path.exists():
            raise FileNotFoundError(f"no such file or directory: {path}")
        data = open_structures(path, trust_pickle=trust_pickle)
        first = data[0]
        task = "relax" if ("relaxed_energy" in first.info or "relaxed_positions" in first.arrays) else "s2ef"
        items.append(DataItem(path.stem, task, path, data, trust_pickle=trust_pickle))
    return items


def is_emt_data(paths: list[str]) -> bool:
    """Whether the data were labelled by ASE's EMT (the built-in reference data)."""
    for raw in paths:
        meta = Path(raw) / "metadata.json"
        if meta.exists() and "EMT" in json.dumps(json.loads(meta.read_text())).upper():
            return True
    return False

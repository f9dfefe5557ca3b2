"""Helpers shared by the subcommands: opening structure files, finding data splits."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DataItem", "OPTIMIZER_NAMES", "TRUST_PICKLE_HELP", "add_trust_pickle_argument", "check_device", "data_items",
    "describe_failure", "load_checkpoint_model", "naming", "one_line", "open_input_structures", "open_structures",
    "prepare_output", "write_json",
]

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
#: The batched engine's optimisers (``simulation.optimizers``) and each engine's default.
BATCHED_OPTIMIZER_NAMES = ("FIRE", "LBFGS")
DEFAULT_OPTIMIZER = {"batched": "LBFGS", "ase": "BFGS"}


def add_relax_engine_arguments(parser: Any) -> None:
    """``--engine``, ``--optimizer`` and ``--batch-atoms`` of the commands that relax."""
    parser.add_argument("--engine", choices=("batched", "ase"), default="batched",
                        help="batched: many structures per model call, optimiser state in torch (default); "
                             "ase: one ASE optimiser per structure")
    parser.add_argument("--optimizer", choices=OPTIMIZER_NAMES, default=None,
                        help="default LBFGS (batched; FIRE and LBFGS as ASE defines them) or BFGS (ase)")
    parser.add_argument("--batch-atoms", type=int, default=None,
                        help="batched engine: most atoms per model call (default: 512 on a CPU, sized from free "
                             "memory on a GPU)")


def resolve_relax_engine(command: str, args: Any) -> None:
    """Fill in ``args.optimizer`` for the chosen engine, or exit saying what does not fit."""
    if args.optimizer is None:
        args.optimizer = DEFAULT_OPTIMIZER[args.engine]
    if args.engine == "batched":
        if args.optimizer not in BATCHED_OPTIMIZER_NAMES:
            raise SystemExit(f"scn {command}: the batched engine has {' and '.join(BATCHED_OPTIMIZER_NAMES)}; "
                             f"use --engine ase for {args.optimizer}")
        if getattr(args, "rotation_average", 0):
            raise SystemExit(f"scn {command}: --rotation-average needs --engine ase")
    if args.batch_atoms is not None and args.batch_atoms < 1:
        raise SystemExit(f"scn {command}: --batch-atoms must be >= 1, got {args.batch_atoms}")


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
        if len(data) == 0:
            raise ValueError(f"{path} holds no structures")
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


# ---------------------------------------------------------------------- shared by predict, eval, relax


def one_line(err: BaseException) -> str:
    """An exception as one line: its first line of text, after its type unless it is one of
    the ValueError / OSError kinds whose messages say what is wrong by themselves."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return lines[0] if isinstance(err, (ValueError, OSError)) else f"{type(err).__name__}: {lines[0]}"


def naming(path: Path | str, message: str) -> str:
    """``message``, prefixed with ``path`` unless it names it already."""
    return message if str(path) in message else f"{path}: {message}"


def check_device(command: str, device: str) -> Any:
    """``torch.device(device)``, or a ``SystemExit`` when it is malformed or not usable here
    (checked before any work, so that it is not mistaken for a bad checkpoint)."""
    import torch

    try:
        parsed = torch.device(device)
        torch.zeros(1, device=parsed)
    except (RuntimeError, AssertionError, ValueError, TypeError) as err:
        raise SystemExit(f"scn {command}: device {device!r} is not usable: {one_line(err)}") from None
    return parsed


def load_checkpoint_model(
    command: str,
    path: Path | str,
    *,
    weights: str = "auto",
    device: Any = "cpu",
    dtype: Any = None,
    trust_pickle: bool = False,
) -> tuple[Mapping[str, Any], Any]:
    """``(checkpoint dictionary, model in eval mode)`` from ``path`` (an SCN, a SchNet, ...:
    whichever the checkpoint holds; or an ``scn export`` artefact, with an empty dictionary);
    any failure (missing file, directory, empty, truncated, not a checkpoint, another model,
    weights that do not fit, an artefact without ``--trust-pickle``) is a one-line
    ``SystemExit`` naming the file."""
    from ..deployment import is_exported_model
    from ..models.checkpoint import load_model, read_checkpoint

    path = Path(path)
    if not path.exists():
        raise SystemExit(f"scn {command}: no such file: {path} (the checkpoint)")
    try:
        if path.is_file() and is_exported_model(path):  # its metadata reads: an artefact
            # compiled for one dtype and device: moving it elsewhere is the loader's clear error
            return {}, load_model(path, device=device, dtype=dtype, trust_pickle=trust_pickle)
        checkpoint = read_checkpoint(path, trust_pickle=trust_pickle)
        model = load_model(checkpoint, weights=weights, dtype=dtype)
    # the loader names the file for the failures it knows; anything else a file can make
    # torch or the model constructor raise is still this file's fault, not a crash
    except Exception as err:  # noqa: BLE001
        # load_model names a dictionary it was handed "checkpoint": the file is the name here
        message = re.sub(r"^checkpoint: ", "", one_line(err))
        if str(path) not in message:
            message = f"{path}: cannot load the checkpoint: {message}"
        raise SystemExit(f"scn {command}: {message}") from None
    return checkpoint, model.to(device=device)


def open_input_structures(command: str, path: Path | str, trust_pickle: bool = False) -> Sequence[Any]:
    """The structures of ``path`` (:func:`~.common.open_structures`); a missing, unreadable or
    empty file is a one-line ``SystemExit`` naming it."""
    path = Path(path)
    if not path.exists():
        raise SystemExit(f"scn {command}: no such file: {path}")
    try:
        structures = open_structures(path, trust_pickle=trust_pickle)
    except Exception as err:  # noqa: BLE001 - ASE's readers raise many types for a bad file
        raise SystemExit(f"scn {command}: {naming(path, one_line(err))}") from None
    if len(structures) == 0:
        raise SystemExit(f"scn {command}: {path} holds no structures")
    return structures


def prepare_output(command: str, path: Path | None) -> None:
    """Create the parent directory of an output file before any work, so that a path that
    cannot be written fails at once rather than after the computation."""
    if path is None:
        return
    if path.is_dir():
        raise SystemExit(f"scn {command}: output {path} is a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SystemExit(f"scn {command}: cannot create the directory of {path}: {one_line(err)}") from None


def describe_failure(source: Path | str, index: int, message: str) -> str:
    """"structure INDEX of SOURCE: MESSAGE", unless the message already says where."""
    return message if str(source) in message else f"structure {index} of {source}: {message}"


def write_json(path: Path, value: Any, indent: int = 1) -> None:
    """Strict JSON (undefined numbers as null, never a ``NaN`` token)."""
    from ..evaluation.metrics import json_safe

    path.write_text(json.dumps(json_safe(value), indent=indent, allow_nan=False))

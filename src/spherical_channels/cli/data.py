"""``scn data``: convert, check and summarise structure datasets.

Each subcommand is registered by an ``add_<name>(subparsers)`` function listed in
:data:`SUBCOMMANDS`; adding one (e.g. ``generate``) is one more entry there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

from .common import add_trust_pickle_argument

# Defaults of spherical_channels.data.validation (DEFAULT_MAX_ATOMIC_NUMBER, MIN_DISTANCE,
# MAX_ABS_FORCE, MAX_ABS_ENERGY_PER_ATOM), repeated because importing the data package would
# import torch when the parser is built (tests/cli/test_data_cli.py checks they agree).
DEFAULT_MAX_ATOMIC_NUMBER = 89
MIN_DISTANCE = 0.01
MAX_ABS_FORCE = 1e4
MAX_ABS_ENERGY_PER_ATOM = 1e6

__all__ = ["add_parser", "add_generate", "add_convert", "add_check", "add_stats", "SUBCOMMANDS"]

_FORMATS_HELP = "extxyz (.extxyz/.xyz), db (ASE SQLite), aselmdb, oc20-lmdb (.lmdb, read only, needs --trust-pickle)"
_EPILOG_STYLE = argparse.RawDescriptionHelpFormatter


def _add_reading_options(p: argparse.ArgumentParser) -> None:
    """Options for how input structures are read."""
    p.add_argument("--input-format", metavar="F", help=f"input format (default: from the extension): {_FORMATS_HELP}")
    p.add_argument("--energy-key", metavar="K", help="read the energy from info[K] instead of the stored results")
    p.add_argument("--forces-key", metavar="K", help="read forces from the per-atom array K instead of the stored results")
    add_trust_pickle_argument(p)


def _positive(text: str) -> float:
    """argparse type: a float > 0 (``inf`` allowed, to turn a bound off)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _non_negative(text: str) -> float:
    """argparse type: a float >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be finite and >= 0, got {text}")
    return value


def _add_validation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--require-energy", action="store_true", help="a structure without an energy is an error")
    p.add_argument("--require-forces", action="store_true", help="a structure without forces is an error")
    p.add_argument(
        "--max-atomic-number", type=int, default=DEFAULT_MAX_ATOMIC_NUMBER, metavar="Z",
        help=f"largest valid atomic number (default {DEFAULT_MAX_ATOMIC_NUMBER})",
    )
    p.add_argument(
        "--min-distance", type=_non_negative, default=MIN_DISTANCE, metavar="A",
        help=f"atoms this close (Angstrom) or closer overlap (default {MIN_DISTANCE}; 0: no overlap search)",
    )
    # Bounds far beyond any DFT label (see spherical_channels.data.validation for the numbers):
    # a value past them is a unit or parsing error, and would wreck training.
    p.add_argument(
        "--max-force", type=_positive, default=MAX_ABS_FORCE, metavar="F",
        help=f"largest plausible force component, eV/A (default {MAX_ABS_FORCE:g}; inf: no bound)",
    )
    p.add_argument(
        "--max-energy-per-atom", type=_positive, default=MAX_ABS_ENERGY_PER_ATOM, metavar="E",
        help=f"largest plausible |energy| per atom, eV (default {MAX_ABS_ENERGY_PER_ATOM:g}, above all-electron "
        "energies; inf: no bound)",
    )


def _open(args: argparse.Namespace, command: str, **kwargs):
    """``open_dataset`` from the common options (and the validation options, where the command
    has them); user errors become SystemExit."""
    from ..data.datasets import DataError, open_dataset

    if hasattr(args, "require_energy"):
        kwargs = dict(
            require_energy=args.require_energy,
            require_forces=args.require_forces,
            max_atomic_number=args.max_atomic_number,
            min_distance=args.min_distance,
            max_abs_force=None if args.max_force == float("inf") else args.max_force,
            max_abs_energy_per_atom=None if args.max_energy_per_atom == float("inf") else args.max_energy_per_atom,
            **kwargs,
        )
    try:
        return open_dataset(
            args.input,
            args.input_format,
            energy_key=args.energy_key,
            forces_key=args.forces_key,
            trust_pickle=args.trust_pickle,
            **kwargs,
        )
    except DataError as err:
        raise SystemExit(f"scn data {command}: {err}") from None


# ---------------------------------------------------------------------------- convert
def add_convert(subparsers: argparse._SubParsersAction) -> None:
    """Register ``scn data convert``."""
    p = subparsers.add_parser(
        "convert",
        help="convert a structure dataset to another format",
        formatter_class=_EPILOG_STYLE,
        description=(
            "Convert structures from INPUT (a file, or a directory of shards) to OUTPUT, one "
            "structure at a time. Energies, forces, fixed atoms and tags are kept exactly "
            "(extxyz is written with full float64 precision). Each structure is validated; "
            "the first bad one stops the conversion unless --skip-invalid."
        ),
        epilog=(
            "examples:\n"
            "  scn data convert train.extxyz train.aselmdb\n"
            "  scn data convert oc20_shards/ train.extxyz --skip-invalid\n"
            "  scn data convert mace.xyz mace.db --energy-key REF_energy --forces-key REF_forces"
        ),
    )
    p.add_argument("input", type=Path, metavar="INPUT", help="file or directory of shards")
    p.add_argument("output", type=Path, metavar="OUTPUT", help="new file (extxyz, .db or .aselmdb)")
    p.add_argument("--format", metavar="F", help="output format (default: from OUTPUT's extension)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--skip-invalid", action="store_true", help="skip (and list) bad structures instead of stopping")
    _add_reading_options(p)
    _add_validation_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..data.datasets import DataError, write_dataset

    ds = _open(args, "convert")
    skipped: list[DataError] = []

    def frames():  # streamed: one structure in memory at a time
        for index in tqdm(range(len(ds)), desc="convert", unit="structure", disable=args.quiet):
            try:
                yield ds.get(index, validate=True)
            except DataError as err:
                if not args.skip_invalid:
                    raise
                skipped.append(err)
                if not args.quiet:
                    print(f"skipped: {err}")

    try:
        count = write_dataset(frames(), args.output, args.format, overwrite=args.overwrite)
    except (DataError, FileExistsError) as err:
        raise SystemExit(f"scn data convert: {err}") from None
    if not args.quiet:
        note = f", {len(skipped)} skipped" if skipped else ""
        print(f"{count} structures written to {args.output}{note}")
    return 0


# ---------------------------------------------------------------------------- check
def add_check(subparsers: argparse._SubParsersAction) -> None:
    """Register ``scn data check``."""
    p = subparsers.add_parser(
        "check",
        help="validate every structure of a dataset and list the bad ones",
        formatter_class=_EPILOG_STYLE,
        description=(
            "Read and validate every structure of PATH: non-finite positions, cell, energy "
            "or forces; wrong shapes; unknown elements; overlapping atoms (also with "
            "periodic images); singular periodic cells; missing targets with --require-*. "
            "Lists all bad structures (file and structure index); exit status 1 if any."
        ),
        epilog="examples:\n  scn data check train.extxyz --require-energy --require-forces\n  scn data check oc20_shards/",
    )
    p.add_argument("input", type=Path, metavar="PATH", help="file or directory")
    _add_reading_options(p)
    _add_validation_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar; print only errors")
    p.set_defaults(func=_run_check)


def _run_check(args: argparse.Namespace) -> int:
    from ..data.datasets import validate_dataset

    ds = _open(args, "check")
    errors = validate_dataset(ds, progress=not args.quiet)
    for err in errors:
        print(err)
    if not args.quiet or errors:
        print(f"{len(ds)} structures, {len(errors)} invalid ({ds.format}: {ds.path})")
    return 1 if errors else 0


# ---------------------------------------------------------------------------- stats
def add_stats(subparsers: argparse._SubParsersAction) -> None:
    """Register ``scn data stats``."""
    p = subparsers.add_parser(
        "stats",
        help="per-element reference energies, energy and force scales of a dataset",
        formatter_class=_EPILOG_STYLE,
        description=(
            "Compute the statistics a trainer stores with the model: per-element reference "
            "energies (least-squares fit of energy to composition), mean and standard "
            "deviation of the per-atom residual energy, force RMS, mean structure size."
        ),
        epilog="examples:\n  scn data stats train.extxyz --json stats.json\n  scn data stats train.aselmdb --max-structures 100000",
    )
    p.add_argument("input", type=Path, metavar="PATH", help="file or directory")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the statistics as JSON")
    p.add_argument("--max-structures", type=int, metavar="N", help="use only the first N structures")
    _add_reading_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar or table")
    p.set_defaults(func=_run_stats)


def _run_stats(args: argparse.Namespace) -> int:
    from ase.data import chemical_symbols

    from ..data.datasets import DataError
    from ..data.statistics import compute_statistics

    if args.max_structures is not None and args.max_structures < 1:
        raise SystemExit("scn data stats: --max-structures must be >= 1")
    ds = _open(args, "stats")
    try:
        stats = compute_statistics(ds, max_structures=args.max_structures, progress=not args.quiet)
    except DataError as err:
        raise SystemExit(f"scn data stats: {err} (run 'scn data check' to list all bad structures)") from None
    if not args.quiet:
        print(f"{stats.num_structures} structures ({stats.num_with_energy} with energy, "
              f"{stats.num_with_forces} with forces), {stats.mean_num_atoms:.2f} atoms on average")
        if not stats.num_with_energy:
            print("no energies: element energies are not fitted (all 0)")
        print(f"{'Z':>4} {'element':<8} {'e_Z / eV':>16}")
        for z, e in stats.element_energies.items():
            note = "  (absent: 0)" if z in stats.missing_elements else ""
            print(f"{z:>4} {chemical_symbols[z]:<8} {e:>16.6f}{note}")
        for label, value, unit in (
            ("residual energy per atom, mean", stats.energy_per_atom_mean, "eV/atom"),
            ("residual energy per atom, std", stats.energy_per_atom_std, "eV/atom"),
            ("force RMS", stats.force_rms, "eV/A"),
        ):
            print(f"{label:<32} " + ("n/a" if value is None else f"{value:.6g} {unit}"))
    if args.json:
        args.json.write_text(json.dumps(stats.to_dict(), indent=2) + "\n")
    return 0


def add_generate(subparsers: argparse._SubParsersAction) -> None:
    """Register ``scn data generate``."""
    p = subparsers.add_parser(
        "generate",
        help="generate the built-in OC20-like reference data (EMT labels)",
        description=(
            "Generate an OC20-like data set labelled by ASE's EMT calculator, offline and seeded: "
            "adsorbates on fcc(111)/(100)/(211) slabs of Al, Cu, Ag, Au, Ni, Pd, Pt and alloys; "
            "S2EF frames (relaxation trajectories and rattled structures) and IS2RE/IS2RS pairs, "
            "in OC20's splits (train, val_id, test_id, test_ood_ads, test_ood_cat, test_ood_both). "
            "Systems whose adsorbate desorbs or breaks apart are dropped and counted."
        ),
        epilog=(
            "examples:\n"
            "  scn data generate data/reference --size small      # ~1 min, ~1300 training frames\n"
            "  scn data generate /tmp/tiny --size tiny --seed 3    # seconds, for tests"
        ),
        formatter_class=_EPILOG_STYLE,
    )
    p.add_argument("output", type=Path, help="output directory (new, or a previous output of this command)")
    p.add_argument("--size", choices=("tiny", "small", "medium"), default="small")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from ..data.reference import generate_reference_data

    try:
        report = generate_reference_data(args.output, size=args.size, seed=args.seed, progress=not args.quiet)
    except ValueError as err:
        raise SystemExit(f"scn data generate: {err}") from None
    print(report.summary())
    return 0


#: ``scn data`` subcommands, in help order. Add one by appending its ``add_*`` function.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_generate, add_convert, add_check, add_stats]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``scn data`` and its subcommands."""
    p = subparsers.add_parser(
        "data",
        help="convert, check and summarise structure datasets",
        description=f"Work with structure datasets. Formats: {_FORMATS_HELP}; a directory of files of one format is one dataset.",
    )
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    sub.required = True
    for add in SUBCOMMANDS:
        add(sub)

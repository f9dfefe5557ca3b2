"""``scn eval``: OC20 metrics of a checkpoint on data sets, per split."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["add_parser"]

EPILOG = """\
examples:
  scn eval runs/demo/checkpoints/best.pt data/                     # every split of generated data
  scn eval best.pt val.extxyz test.aselmdb -o metrics.json --baseline
  scn eval best.pt data/ --max-relax 20 --fmax 0.05                # fewer relaxations (IS2RE/IS2RS)
"""

_COLUMNS = [
    ("energy_mae", "E MAE eV", "{:.4f}"),
    ("force_mae", "F MAE eV/A", "{:.4f}"),
    ("force_cos", "F cos", "{:.3f}"),
    ("efwt", "EFwT", "{:.3f}"),
    ("is2re_mae", "IS2RE MAE", "{:.4f}"),
    ("ewt", "EwT", "{:.3f}"),
    ("adwt", "ADwT", "{:.3f}"),
    ("afbt", "AFbT", "{:.3f}"),
]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``scn eval``."""
    from .common import OPTIMIZER_NAMES

    p = subparsers.add_parser(
        "eval",
        help="OC20 metrics (S2EF, IS2RE, IS2RS) of a checkpoint on data sets",
        description=(
            "Evaluate CHECKPOINT on DATA: S2EF files give energy MAE, force MAE and cosine on free "
            "atoms, and EFwT; files of initial structures with relaxed targets (relaxed_energy, "
            "relaxed_positions) are relaxed with the model and give IS2RE (MAE, EwT) and IS2RS "
            "(ADwT; AFbT when a reference calculator is known, as for the built-in EMT data). A "
            "directory written by 'scn data generate' is evaluated split by split."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint")
    p.add_argument("data", nargs="+", help="data files or generated-data directories")
    p.add_argument("-o", "--output", type=Path, help="write the metrics as JSON")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-structures", type=int, help="evaluate at most this many S2EF structures per file")
    p.add_argument("--max-relax", type=int, help="relax at most this many structures per file")
    p.add_argument("--no-relax", action="store_true", help="skip IS2RE/IS2RS (relaxations)")
    p.add_argument("--optimizer", choices=OPTIMIZER_NAMES, default="BFGS")
    p.add_argument("--fmax", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--reference", choices=("auto", "emt", "none"), default="auto",
                   help="calculator giving the true forces for AFbT (auto: EMT for the built-in data)")
    p.add_argument("--baseline", action="store_true", help="also report the per-element-energy, zero-force baseline")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..evaluation.evaluate import evaluate_relaxations, evaluate_s2ef, s2ef_baseline
    from ..models.checkpoint import load_model, read_checkpoint
    from ..simulation import SCNCalculator
    from .common import data_items, is_emt_data

    try:
        checkpoint = read_checkpoint(args.checkpoint)
        model = load_model(checkpoint, device=args.device)
        items = data_items(args.data)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"scn eval: {err}") from None
    element_energies = _element_energies(checkpoint) if args.baseline else None
    reference = None
    if args.reference == "emt" or (args.reference == "auto" and is_emt_data(args.data)):
        from ase.calculators.emt import EMT

        reference = EMT
    calculator = SCNCalculator(model, device=args.device)
    rows: dict[str, dict] = {}
    for item in items:
        row = rows.setdefault(item.name, {})
        try:
            data = item.open()
            if item.task == "s2ef":
                row["s2ef"] = evaluate_s2ef(model, data, args.batch_size, args.device,
                                            max_structures=args.max_structures, progress=not args.quiet)
                if element_energies is not None:
                    row["baseline"] = s2ef_baseline(data, element_energies, batch_size=args.batch_size,
                                                    max_structures=args.max_structures)
            elif not args.no_relax:
                result = evaluate_relaxations(calculator, data, args.optimizer, args.fmax, args.steps,
                                              reference_calculator=reference, max_structures=args.max_relax,
                                              progress=not args.quiet)
                row["relax"] = {k: v for k, v in result.items() if k != "relaxations"}
        except ValueError as err:
            raise SystemExit(f"scn eval: {item.path}: {err}") from None
    if not args.quiet:
        print(format_table(rows))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"checkpoint": str(args.checkpoint), "splits": rows}, indent=2))
    return 0


def _element_energies(checkpoint: Mapping[str, Any]) -> dict[int, float]:
    stats = checkpoint.get("statistics")
    if not stats:
        raise SystemExit("scn eval: --baseline needs a checkpoint trained by this package (it stores the per-element energies)")
    return {int(z): float(e) for z, e in stats["element_energies"].items()}


def flatten(row: dict) -> dict[str, float]:
    """One split's metrics as the table's columns."""
    flat = dict(row.get("s2ef", {}))
    relax = row.get("relax", {})
    if "is2re" in relax:
        flat["is2re_mae"], flat["ewt"] = relax["is2re"]["energy_mae"], relax["is2re"]["ewt"]
    flat.update({k: v for k, v in relax.get("is2rs", {}).items() if k in ("adwt", "afbt")})
    return flat


def format_table(rows: dict[str, dict]) -> str:
    """A fixed-width table: one row per split (and its baseline, if computed)."""
    header = f"{'split':<16}" + "".join(f"{title:>12}" for _, title, _ in _COLUMNS)
    lines = [header, "-" * len(header)]
    for name, row in rows.items():
        for label, values in ((name, flatten(row)), (f"  baseline", row.get("baseline"))):
            if not values:
                continue
            cells = []
            for key, _, fmt in _COLUMNS:
                value = values.get(key)
                cells.append(f"{fmt.format(value):>12}" if value is not None and not math.isnan(value) else f"{'-':>12}")
            lines.append(f"{label:<16}" + "".join(cells))
    return "\n".join(lines)

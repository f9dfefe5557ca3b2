"""``scn eval``: OC20 metrics of a checkpoint on data sets, per split."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["add_parser"]

EPILOG = """\
examples:
  scn eval runs/demo/checkpoints/best.pt data/                     # every split of generated data
  scn eval best.pt val.extxyz test.aselmdb -o metrics.json --baseline
  scn eval best.pt data/ --max-relax 20 --fmax 0.05                # fewer relaxations (IS2RE/IS2RS)
  torchrun --standalone --nproc_per_node=8 $(which scn) eval best.pt data/ -o metrics.json   # 8 processes

under torchrun each process evaluates its share of every split (S2EF batches, relaxations) and
rank 0 reports the metrics of all, the same as one process reports.
"""

_COLUMNS = [
    ("num_structures", "N", "{:d}"),
    ("energy_mae", "E MAE eV", "{:.4f}"),
    ("force_mae", "F MAE eV/A", "{:.4f}"),
    ("force_cos", "F cos", "{:.3f}"),
    ("efwt", "EFwT", "{:.3f}"),
    ("is2re_mae", "IS2RE MAE", "{:.4f}"),
    ("ewt", "EwT", "{:.3f}"),
    ("adwt", "ADwT", "{:.3f}"),
    ("adwt_adsorbate", "ADwT ads", "{:.3f}"),
    ("afbt", "AFbT", "{:.3f}"),
]

#: The label of the unrelaxed-baseline row, and the note that explains it under the table.
UNRELAXED_LABEL = "  unrelaxed"
UNRELAXED_NOTE = ("unrelaxed: the initial structures as the prediction, to show what relaxing gained (IS2RE: the "
                  "model's energy at the initial positions; ADwT: initial vs relaxed positions; AFbT: reference "
                  "forces at the initial positions)")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``scn eval``."""
    from .common import add_relax_engine_arguments, add_trust_pickle_argument

    p = subparsers.add_parser(
        "eval",
        help="OC20 metrics (S2EF, IS2RE, IS2RS) of a checkpoint on data sets",
        description=(
            "Evaluate CHECKPOINT on DATA: S2EF files give energy MAE, force MAE and cosine on free "
            "atoms, and EFwT; files of initial structures with relaxed targets (relaxed_energy, "
            "relaxed_positions) are relaxed with the model and give IS2RE (MAE, EwT) and IS2RS "
            "(ADwT, also over the adsorbate atoms only (tag 2); AFbT when a reference calculator is "
            "known, as for the built-in EMT data), next to an 'unrelaxed' row: the same metrics of the "
            "initial structures, with the model's energy at the initial positions as the IS2RE "
            "prediction, to show whether relaxing helped. A "
            "directory written by 'scn data generate' is evaluated split by split. Each metric "
            "covers the structures that have what it needs (energy metrics: a reference energy; force "
            "metrics: reference forces; EFwT: both), and the report says how many that was; metrics "
            "with nothing to cover are '-' in the table and null in the JSON. A structure that "
            "cannot be relaxed is reported and left out of IS2RE/IS2RS. Relaxations use the batched "
            "engine (LBFGS by default) unless --engine ase."
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
    add_relax_engine_arguments(p)
    p.add_argument("--fmax", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--reference", choices=("auto", "emt", "none"), default="auto",
                   help="calculator giving the true forces for AFbT (auto: EMT for the built-in data)")
    p.add_argument("--baseline", action="store_true", help="also report the per-element-energy, zero-force baseline")
    add_trust_pickle_argument(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import torch

    from .. import sharding
    from ..evaluation.evaluate import evaluate_relaxations, evaluate_s2ef, s2ef_baseline
    from ..simulation import SCNCalculator
    from .common import data_items, is_emt_data, resolve_relax_engine
    from .common import describe_failure, load_checkpoint_model, naming, one_line, prepare_output

    for name in ("batch_size", "max_structures", "max_relax"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"scn eval: --{name.replace('_', '-')} must be >= 1, got {value}")
    if not args.fmax > 0 or args.steps < 0:
        raise SystemExit(f"scn eval: need --fmax > 0 and --steps >= 0, got {args.fmax} and {args.steps}")
    resolve_relax_engine("eval", args)
    # under torchrun each rank evaluates its share of every split, and all get the metrics
    ctx = sharding.join("eval", args.device)
    device = ctx.device
    checkpoint, model = load_checkpoint_model("eval", args.checkpoint, device=device, dtype=torch.float32,
                                              trust_pickle=args.trust_pickle)
    element_energies = _element_energies(checkpoint, args.checkpoint) if args.baseline else None
    items = []
    for path in args.data:  # one at a time, to name the one that fails
        try:
            items.extend(data_items([path], trust_pickle=args.trust_pickle))
        except Exception as err:  # noqa: BLE001 - a bad data file, whichever reader raised
            raise SystemExit(f"scn eval: {naming(path, one_line(err))}") from None
    prepare_output("eval", args.output)
    calculator = None
    if not args.no_relax and any(item.task == "relax" for item in items):
        try:
            calculator = SCNCalculator(model, device=device)
        except ValueError as err:  # e.g. a model without forces
            raise SystemExit(f"scn eval: {naming(args.checkpoint, one_line(err))}") from None
        if args.engine == "batched":
            calculator = model  # the batched engine calls the model itself
    reference = None
    if args.reference == "emt" or (args.reference == "auto" and is_emt_data(args.data)):
        from ase.calculators.emt import EMT

        reference = EMT
    rows: dict[str, dict] = {}
    for item in items:
        row = rows.setdefault(item.name, {})
        try:
            data = item.open()
            if len(data) == 0:
                raise ValueError("holds no structures")
            if item.task == "s2ef":
                row["s2ef"] = evaluate_s2ef(model, data, args.batch_size, device,
                                            max_structures=args.max_structures, progress=not args.quiet, ctx=ctx)
                if element_energies is not None:
                    row["baseline"] = s2ef_baseline(data, element_energies, batch_size=args.batch_size,
                                                    max_structures=args.max_structures, ctx=ctx)
            elif calculator is not None:

                def report(index: int, message: str, path: Path = item.path) -> None:
                    print(f"scn eval: not relaxed: {describe_failure(path, index, message)}", file=sys.stderr)

                result = evaluate_relaxations(calculator, data, args.optimizer, args.fmax, args.steps,
                                              reference_calculator=reference, max_structures=args.max_relax,
                                              progress=not args.quiet, on_failure=report, ctx=ctx,
                                              batch_atoms=args.batch_atoms)
                row["relax"] = {k: v for k, v in result.items() if k != "relaxations"}
                row["relax"]["failed"] = [r for r in result["relaxations"] if "error" in r]
        except Exception as err:  # noqa: BLE001 - name the file; the splits done so far are kept
            # an error in one rank's share is raised on every rank: all of them stop here
            message = naming(item.path, one_line(err))
            if not row:
                del rows[item.name]
            if ctx.is_main:
                _write(args, rows, incomplete=message)
            sharding.finish(ctx, f"scn eval: {message}" + (f" (the splits done are in {args.output})"
                                                           if args.output else ""))
    if ctx.is_main:  # every rank has the metrics; one reports them
        if not args.quiet:
            print(format_table(rows))
            for line in coverage_notes(rows):
                print(line)
        _write(args, rows)
    sharding.finish(ctx, None)
    return 0


def _write(args: argparse.Namespace, rows: dict[str, dict], incomplete: str | None = None) -> None:
    """The metrics as strict JSON (undefined ones null); ``incomplete`` says why a run stopped."""
    from .common import write_json

    if args.output:
        report: dict[str, Any] = {"checkpoint": str(args.checkpoint), "splits": rows}
        if incomplete is not None:
            report["incomplete"] = incomplete
        write_json(args.output, report, indent=2)


def _element_energies(checkpoint: Mapping[str, Any], path: str) -> dict[int, float]:
    stats = checkpoint.get("statistics")
    if not stats or "element_energies" not in stats:
        raise SystemExit(f"scn eval: {path}: --baseline needs a checkpoint trained by this package "
                         "(it stores the per-element energies)")
    return {int(z): float(e) for z, e in stats["element_energies"].items()}


def coverage_notes(rows: dict[str, dict]) -> list[str]:
    """One line per split whose metrics do not all cover the same structures (some lack an
    energy or forces), or whose relaxations partly failed: what each metric covers."""
    lines = []
    for name, row in rows.items():
        s2ef = row.get("s2ef")
        if s2ef:
            n = s2ef["num_structures"]
            counts = (s2ef["num_energy_structures"], s2ef["num_force_structures"], s2ef["num_efwt_structures"])
            if counts != (n, n, n):
                lines.append(f"{name}: of {n} structures, energy metrics cover {counts[0]}, force metrics "
                             f"{counts[1]}, EFwT {counts[2]} (the others lack a reference energy or forces)")
        relax = row.get("relax")
        if relax and relax.get("num_failed"):
            lines.append(f"{name}: {relax['num_failed']} of {relax['num_structures']} relaxations failed "
                         "(left out of IS2RE/IS2RS)")
        if relax and relax.get("num_reference_failed"):
            lines.append(f"{name}: the reference calculator failed on {relax['num_reference_failed']} relaxed "
                         "structures (left out of AFbT)")
    return lines


def flatten(row: dict) -> dict[str, float]:
    """One split's metrics as the table's columns."""
    flat = dict(row.get("s2ef", {}))
    relax = row.get("relax", {})
    if "is2re" in relax:
        flat["is2re_mae"], flat["ewt"] = relax["is2re"]["energy_mae"], relax["is2re"]["ewt"]
    flat.update({k: v for k, v in relax.get("is2rs", {}).items() if k in ("adwt", "adwt_adsorbate", "afbt")})
    if "num_structures" not in flat and "num_structures" in relax:
        flat["num_structures"] = relax["num_structures"]
    return flat


def flatten_unrelaxed(row: dict) -> dict[str, float]:
    """One split's unrelaxed baseline (the initial structures as the prediction) as the table's
    columns; empty when the split was not relaxed. ``N`` is the structures it covers."""
    unrelaxed = row.get("relax", {}).get("unrelaxed") or {}
    flat: dict[str, float] = {}
    if "is2re" in unrelaxed:
        flat["is2re_mae"], flat["ewt"] = unrelaxed["is2re"]["energy_mae"], unrelaxed["is2re"]["ewt"]
    flat.update({k: v for k, v in unrelaxed.get("is2rs", {}).items() if k in ("adwt", "adwt_adsorbate", "afbt")})
    counts = [group["num_structures"] for group in unrelaxed.values() if isinstance(group, dict) and "num_structures" in group]
    if counts:
        flat["num_structures"] = max(counts)
    return flat


def format_table(rows: dict[str, dict]) -> str:
    """A fixed-width table: one row per split, followed by its S2EF baseline (if computed) and,
    for relaxed splits, its unrelaxed baseline (:func:`flatten_unrelaxed`, explained by a note
    under the table)."""
    header = f"{'split':<16}" + "".join(f"{title:>12}" for _, title, _ in _COLUMNS)
    lines = [header, "-" * len(header)]
    unrelaxed_shown = False
    for name, row in rows.items():
        for label, values in ((name, flatten(row)), ("  baseline", row.get("baseline")),
                              (UNRELAXED_LABEL, flatten_unrelaxed(row))):
            if not values:
                continue
            unrelaxed_shown |= label == UNRELAXED_LABEL
            cells = []
            for key, _, fmt in _COLUMNS:
                value = values.get(key)
                defined = isinstance(value, (int, float)) and math.isfinite(value)
                cells.append(f"{fmt.format(value):>12}" if defined else f"{'-':>12}")
            lines.append(f"{label:<16}" + "".join(cells))
    if unrelaxed_shown:
        lines.append(UNRELAXED_NOTE)
    return "\n".join(lines)

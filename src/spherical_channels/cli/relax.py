"""``scn relax``: relax structures with a model and an ASE optimiser."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["add_parser"]

EPILOG = """\
examples:
  scn relax runs/demo/checkpoints/best.pt initial.extxyz -o relaxed.extxyz
  scn relax scn_oc20.pt slabs.traj --optimizer FIRE --fmax 0.03 --trajectory-dir trajs/
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``scn relax``."""
    from .common import OPTIMIZER_NAMES

    p = subparsers.add_parser(
        "relax",
        help="relax structures with a model (fixed atoms stay fixed)",
        description=(
            "Relax every structure of STRUCTURES with the model in CHECKPOINT (this package's "
            "checkpoints or official OC20 SCN ones) and an ASE optimiser. Atoms fixed by a "
            "FixAtoms constraint (or move_mask) stay in place."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint")
    p.add_argument("structures", help="any data set file (extxyz, .db, .aselmdb, OC20 .lmdb) or ASE-readable file")
    p.add_argument("-o", "--output", type=Path, default=Path("relaxed.extxyz"), help="relaxed structures (extxyz)")
    p.add_argument("--trajectory-dir", type=Path, help="write one ASE trajectory per structure here")
    p.add_argument("--optimizer", choices=OPTIMIZER_NAMES, default="BFGS")
    p.add_argument("--fmax", type=float, default=0.05, help="force convergence criterion, eV/A (default 0.05)")
    p.add_argument("--steps", type=int, default=200, help="maximum optimiser steps (default 200)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rotation-average", type=int, default=0, help="average over N random rotations")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..data.formats.extxyz import ExtxyzWriter
    from ..simulation import SCNCalculator, relax
    from .common import open_structures

    try:
        calculator = SCNCalculator(args.checkpoint, device=args.device, rotation_average=args.rotation_average)
        structures = open_structures(args.structures)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"scn relax: {err}") from None
    results = []
    args.output.parent.mkdir(parents=True, exist_ok=True)
    relaxed_frames = []
    for index in tqdm(range(len(structures)), desc="relax", unit="structure", disable=args.quiet):
        trajectory = args.trajectory_dir / f"{index:05d}.traj" if args.trajectory_dir else None
        try:
            result = relax(structures[index], calculator, args.optimizer, args.fmax, args.steps, trajectory)
        except ValueError as err:
            raise SystemExit(f"scn relax: structure {index} of {args.structures}: {err}") from None
        relaxed_frames.append(result.atoms)
        results.append({"index": index, "converged": result.converged, "steps": result.steps,
                        "energy": result.energy, "max_force": result.max_force})
    with ExtxyzWriter(args.output) as writer:  # exact floats, FixAtoms as move_mask
        for frame in relaxed_frames:
            writer.write(frame)
    summary = args.output.with_suffix(".json")
    summary.write_text(json.dumps(results, indent=1))
    if not args.quiet:
        print(f"{'#':>4} {'converged':>9} {'steps':>5} {'energy / eV':>14} {'max|F| / eV/A':>14}")
        for r in results:
            print(f"{r['index']:>4} {str(r['converged']):>9} {r['steps']:>5} {r['energy']:>14.5f} {r['max_force']:>14.4f}")
        print(f"relaxed structures: {args.output}; summary: {summary}")
    return 0

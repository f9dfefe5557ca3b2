"""``scn relax``: relax structures with a model and an ASE optimiser."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_parser"]

EPILOG = """\
examples:
  scn relax runs/demo/checkpoints/best.pt initial.extxyz -o relaxed.extxyz
  scn relax scn_oc20.pt slabs.traj --optimizer FIRE --fmax 0.03 --trajectory-dir trajs/
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``scn relax``."""
    from .common import OPTIMIZER_NAMES, add_trust_pickle_argument

    p = subparsers.add_parser(
        "relax",
        help="relax structures with a model (fixed atoms stay fixed)",
        description=(
            "Relax every structure of STRUCTURES with the model in CHECKPOINT (this package's "
            "checkpoints or official OC20 SCN ones) and an ASE optimiser. Atoms fixed by a "
            "FixAtoms constraint (or move_mask) stay in place. A structure that fails is reported and "
            "skipped (the output's info 'source_index' says which input each frame is); the command "
            "then exits with status 1. Relaxed structures are kept even if the run is interrupted."
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
    add_trust_pickle_argument(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from ..data.formats.extxyz import ExtxyzWriter
    from ..simulation import SCNCalculator, relax
    from .common import (
        check_device,
        describe_failure,
        load_checkpoint_model,
        one_line,
        open_input_structures,
        prepare_output,
        write_json,
    )

    if not args.fmax > 0 or args.steps < 0:
        raise SystemExit(f"scn relax: need --fmax > 0 and --steps >= 0, got {args.fmax} and {args.steps}")
    if args.output.suffix == ".json":
        raise SystemExit(f"scn relax: -o {args.output}: the summary is written next to the output as .json; "
                         "give the relaxed structures another suffix (.extxyz)")
    device = check_device("relax", args.device)
    _, model = load_checkpoint_model("relax", args.checkpoint, device=device, dtype=torch.float32,
                                     trust_pickle=args.trust_pickle)
    try:
        calculator = SCNCalculator(model, device=device, rotation_average=args.rotation_average)
    except ValueError as err:
        raise SystemExit(f"scn relax: {args.checkpoint}: {one_line(err)}") from None
    structures = open_input_structures("relax", args.structures, trust_pickle=args.trust_pickle)
    prepare_output("relax", args.output)
    summary = args.output.with_suffix(".json")

    results: list[dict] = []
    # each relaxed structure is appended as soon as it is done, and whatever happens later (a
    # failing structure, an interruption) the ones already relaxed end up in the output
    partial = args.output.with_name(f".{args.output.name}.partial")
    writer = ExtxyzWriter(partial)  # exact floats, FixAtoms as move_mask
    interrupted = True
    try:
        for index in tqdm(range(len(structures)), desc="relax", unit="structure", disable=args.quiet):
            trajectory = args.trajectory_dir / f"{index:05d}.traj" if args.trajectory_dir else None
            try:
                result = relax(structures[index], calculator, args.optimizer, args.fmax, args.steps, trajectory)
            except Exception as err:  # noqa: BLE001 - report it, go on with the others
                message = one_line(err)
                results.append({"index": index, "error": message})
                print(f"scn relax: failed: {describe_failure(args.structures, index, message)}", file=sys.stderr)
                continue
            # the output skips failed structures: each frame says which input it came from
            result.atoms.info["source_index"] = index
            writer.write(result.atoms)
            results.append({"index": index, "converged": result.converged, "steps": result.steps,
                            "energy": result.energy, "max_force": result.max_force})
        interrupted = False
    finally:
        writer.close()
        if interrupted and not results:  # nothing done: leave any earlier output as it was
            partial.unlink(missing_ok=True)
        else:
            partial.replace(args.output)
            write_json(summary, results)
        if interrupted and results:
            done = sum("error" not in r for r in results)
            print(f"scn relax: stopped after {len(results)} of {len(structures)} structures; the {done} relaxed "
                  f"are in {args.output}, the summary in {summary}", file=sys.stderr)
    if not args.quiet:
        print(f"{'#':>4} {'converged':>9} {'steps':>5} {'energy / eV':>14} {'max|F| / eV/A':>14}")
        for r in results:
            if "error" in r:
                print(f"{r['index']:>4} {'failed':>9}  {r['error']}")
            else:
                print(f"{r['index']:>4} {str(r['converged']):>9} {r['steps']:>5} {r['energy']:>14.5f} "
                      f"{r['max_force']:>14.4f}")
        print(f"relaxed structures: {args.output}; summary: {summary}")
    failed = [r for r in results if "error" in r]
    if failed:
        first = describe_failure(args.structures, failed[0]["index"], failed[0]["error"])
        raise SystemExit(f"scn relax: {len(failed)} of {len(structures)} structures failed (first: {first}); "
                         f"the others are in {args.output}")
    return 0

"""``scn predict``: energies and forces of structures with a checkpoint."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

__all__ = ["add_parser"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``scn predict``."""
    p = subparsers.add_parser(
        "predict",
        help="predict energies and forces of structures with an SCN checkpoint",
        description=(
            "Predict energies and forces with an SCN checkpoint. CHECKPOINT is a checkpoint of "
            "this package ('scn train'), one written by the official implementation (fairchem/OCP "
            "layout, e.g. the released OC20 SCN models), or 'example' for the small random-weight "
            "checkpoint shipped with the package. STRUCTURES is a data set (extxyz, .db, .aselmdb, "
            "OC20 .lmdb), any file ASE can read (all frames are used), or 'example'."
        ),
    )
    p.add_argument("checkpoint", help="checkpoint file, or 'example'")
    p.add_argument("structures", help="structure file readable by ASE (extxyz, traj, db, ...), or 'example'")
    p.add_argument("-o", "--output", type=Path, help="write the structures with predictions (extxyz, streamed)")
    p.add_argument("--json", type=Path, help="also write the predictions as JSON")
    p.add_argument("--batch-size", type=int, default=8, help="structures per batch (default 8)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument(
        "--weights", choices=("auto", "ema", "raw"), default="auto",
        help="'auto' uses EMA weights when the checkpoint has them (as the official calculator)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or table")
    p.set_defaults(func=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    import torch
    from ase.calculators.singlepoint import SinglePointCalculator
    from tqdm import tqdm

    from ..data.batch import AtomicBatch
    from ..data.formats.extxyz import ExtxyzWriter
    from ..models.checkpoint import load_model
    from ..resources import EXAMPLE_CHECKPOINT, EXAMPLE_STRUCTURES, resource_path
    from .common import open_structures

    checkpoint = resource_path(EXAMPLE_CHECKPOINT) if args.checkpoint == "example" else Path(args.checkpoint)
    structures = resource_path(EXAMPLE_STRUCTURES) if args.structures == "example" else Path(args.structures)
    for path in (checkpoint, structures):
        if not path.exists():
            raise SystemExit(f"scn predict: no such file: {path}")
    if args.batch_size < 1:
        raise SystemExit("scn predict: --batch-size must be >= 1")
    dtype = getattr(torch, args.dtype)
    try:
        model = load_model(checkpoint, weights=args.weights, device=args.device, dtype=dtype)
        dataset = open_structures(structures)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"scn predict: {err}") from None

    results = []
    start = time.perf_counter()
    # predictions are appended batch by batch to a temporary file that replaces the output at
    # the end: memory stays flat, and an interrupted run leaves no half-written output
    partial = args.output.with_name(f".{args.output.name}.partial") if args.output else None
    writer = None
    if partial is not None:
        partial.parent.mkdir(parents=True, exist_ok=True)
        writer = ExtxyzWriter(partial)  # exact floats, like every extxyz this package writes
    batches = range(0, len(dataset), args.batch_size)
    for first in tqdm(batches, desc="predict", unit="batch", disable=args.quiet):
        try:
            chunk = [dataset[i] for i in range(first, min(len(dataset), first + args.batch_size))]
        except ValueError as err:
            raise SystemExit(f"scn predict: {err}") from None
        try:
            batch = AtomicBatch.from_atoms(chunk, dtype=dtype, device=args.device)
            with torch.no_grad():
                out = model(batch)
        except ValueError as err:
            raise SystemExit(f"scn predict: structures {first}..{first + len(chunk) - 1} of {structures}: {err}") from None
        forces = out["forces"].cpu().double().numpy()
        offset = 0
        for k, atoms in enumerate(chunk):
            energy = float(out["energy"][k])
            f = forces[offset : offset + len(atoms)]
            offset += len(atoms)
            atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=f)
            results.append({
                "index": first + k,
                "formula": atoms.get_chemical_formula(),
                "natoms": len(atoms),
                "energy": energy,
                "max_force": float(abs(f).max()) if len(f) else 0.0,
                "forces": f.tolist(),
            })
        if writer is not None:
            for atoms in chunk:
                writer.write(atoms)
    elapsed = time.perf_counter() - start

    if not args.quiet:
        print(f"{'#':>4} {'formula':<14} {'atoms':>5} {'energy / eV':>14} {'max|F| / eV/A':>14}")
        for r in results:
            print(f"{r['index']:>4} {r['formula']:<14} {r['natoms']:>5} {r['energy']:>14.6f} {r['max_force']:>14.6f}")
        print(f"{len(results)} structures in {elapsed:.2f} s ({len(results) / elapsed:.1f} structures/s)")
    if writer is not None:
        writer.close()
        partial.replace(args.output)
    if args.json:
        args.json.write_text(json.dumps({"checkpoint": str(checkpoint), "structures": str(structures), "predictions": results}))
    return 0

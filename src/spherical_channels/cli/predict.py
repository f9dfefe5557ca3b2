"""``scn predict``: energies and forces of structures with a checkpoint."""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import (
    describe_failure,
    load_checkpoint_model,
    one_line,
    open_input_structures,
    prepare_output,
    write_json,
)

__all__ = ["add_parser"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``scn predict``."""
    from .common import add_trust_pickle_argument

    p = subparsers.add_parser(
        "predict",
        help="predict energies and forces of structures with an SCN checkpoint",
        description=(
            "Predict energies and forces with an SCN checkpoint. CHECKPOINT is a checkpoint of "
            "this package ('scn train'), one written by the official implementation (fairchem/OCP "
            "layout, e.g. the released OC20 SCN models), or 'example' for the small random-weight "
            "checkpoint shipped with the package. STRUCTURES is a data set (extxyz, .db, .aselmdb, "
            "OC20 .lmdb), any file ASE can read (all frames are used), or 'example'. A structure "
            "the model cannot take is reported and skipped; the command then exits with status 1. "
            "Under torchrun ('torchrun --nproc_per_node=N $(which scn) predict ...') each process "
            "predicts its share of the batches and rank 0 writes the outputs, in input order."
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
    add_trust_pickle_argument(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar or table")
    p.set_defaults(func=_run_predict)


# ---------------------------------------------------------------------- scn predict


def _run_predict(args: argparse.Namespace) -> int:
    import torch

    from .. import sharding
    from ..resources import EXAMPLE_CHECKPOINT, EXAMPLE_STRUCTURES, resource_path

    checkpoint = resource_path(EXAMPLE_CHECKPOINT) if args.checkpoint == "example" else Path(args.checkpoint)
    structures = resource_path(EXAMPLE_STRUCTURES) if args.structures == "example" else Path(args.structures)
    if args.batch_size < 1:
        raise SystemExit("scn predict: --batch-size must be >= 1")
    if args.output is not None and args.json is not None and args.output.resolve() == args.json.resolve():
        raise SystemExit("scn predict: -o and --json name the same file")
    ctx = sharding.join("predict", args.device)  # under torchrun: this rank's device
    device = ctx.device
    dtype = getattr(torch, args.dtype)
    _, model = load_checkpoint_model("predict", checkpoint, weights=args.weights, device=device, dtype=dtype,
                                     trust_pickle=args.trust_pickle)
    dataset = open_input_structures("predict", structures, trust_pickle=args.trust_pickle)
    prepare_output("predict", args.output)
    prepare_output("predict", args.json)

    start = time.perf_counter()
    with sharding.interruptible(ctx):
        results, failures = _predict_all(args, model, dataset, dtype, device, structures, ctx)
    elapsed = max(time.perf_counter() - start, 1e-9)

    message = None
    if ctx.is_main:
        if not args.quiet:
            print(f"{'#':>4} {'formula':<14} {'atoms':>5} {'energy / eV':>14} {'max|F| / eV/A':>14}")
            for r in results:
                print(f"{r['index']:>4} {r['formula']:<14} {r['natoms']:>5} {r['energy']:>14.6f} "
                      f"{r['max_force']:>14.6f}")
            print(f"{len(results)} structures in {elapsed:.2f} s ({len(results) / elapsed:.1f} structures/s)")
        if args.json:
            write_json(args.json, {"checkpoint": str(checkpoint), "structures": str(structures),
                                   "predictions": results, "failures": failures})
        if failures:
            first = failures[0]
            message = (f"scn predict: {len(failures)} of {len(dataset)} structures failed (first: "
                       f"{describe_failure(structures, first['index'], first['error'])}); the others were predicted")
    sharding.finish(ctx, message)  # every rank exits as rank 0 does
    return 0


def _predict_all(
    args: argparse.Namespace, model: Any, dataset: Sequence[Any], dtype: Any, device: Any, source: Path, ctx: Any
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Predict this rank's share of the batches of ``dataset`` (batch ``b``: structures
    ``b * batch_size`` onwards); on rank 0 return every structure's record and every failure
    in input order (empty lists on the other ranks), the structures with their predictions
    written to ``args.output``.

    Predictions are appended batch by batch to a partial file that replaces the output at the
    end: memory stays flat, and an interrupted run leaves no half-written output but keeps
    the partial file. Under ``torchrun`` each rank streams its batches to
    ``.NAME.rankR-of-W.partial`` and holds them until rank 0, which gathers every rank's
    batches in input order, has written the output (then the rank files are removed). The
    batches are the same as in one process, so the predictions are too.
    """
    from .. import sharding
    from ..data.formats.extxyz import ExtxyzWriter

    batches = -(-len(dataset) // args.batch_size)
    partial = sharding.partial_path(args.output, ctx) if args.output else None
    writer = ExtxyzWriter(partial) if partial is not None else None  # exact floats
    predicted = 0  # structures this rank wrote to its partial file

    def work(mine: list[int]) -> list[tuple[list, list, list]]:
        nonlocal predicted
        outcomes = []
        for b in sharding.progress(mine, ctx, desc="predict", unit="batch", disable=args.quiet):
            indices = range(b * args.batch_size, min(len(dataset), (b + 1) * args.batch_size))
            records, failures, frames = [], [], []
            for index, atoms, out in _predict_chunk(model, dataset, indices, dtype, device, failures, source):
                atoms.calc = _single_point(atoms, out)
                record = {"index": index, "formula": atoms.get_chemical_formula(), "natoms": len(atoms),
                          "energy": out["energy"],
                          "max_force": float(abs(out["forces"]).max()) if len(atoms) else 0.0}
                if args.json:  # kept only when asked for: memory stays flat otherwise
                    record["forces"] = out["forces"].tolist()
                records.append(record)
                if writer is not None:
                    writer.write(atoms)
                    predicted += 1
                    if ctx.distributed:  # rank 0 writes the output from the gathered batches
                        frames.append(atoms)
            outcomes.append((records, failures, frames))
        return outcomes

    results: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    done = False
    try:
        outcomes = sharding.run_share(work, batches, ctx)
        if writer is not None:
            writer.close()  # before waiting for the others: this rank's share is safe on disk
        gathered = sharding.gather_in_order(outcomes, batches, ctx)
        staged = sharding.partial_path(args.output, None) if ctx.distributed and ctx.is_main and args.output else None
        final = ExtxyzWriter(staged, label=args.output) if staged is not None else None
        try:
            for _, (records, batch_failures, frames) in gathered:
                results.extend(records)
                failures.extend(batch_failures)
                for atoms in frames if final is not None else ():
                    final.write(atoms)
        except BaseException:
            if final is not None:  # the ranks keep their partial files: no half output
                final.close()
                staged.unlink(missing_ok=True)
            raise
        if final is not None:
            final.close()
            staged.replace(args.output)
        done = True
    finally:
        if writer is not None:
            writer.close()
            if done and not ctx.distributed:
                partial.replace(args.output)
            elif not done and predicted:  # interrupted: keep what was predicted, under its temporary name
                rank = f"rank {ctx.rank} of {ctx.world_size}: " if ctx.distributed else ""
                print(f"scn predict: {rank}interrupted; the {predicted} structures predicted so far are in {partial}",
                      file=sys.stderr)
            elif not done:
                partial.unlink(missing_ok=True)
    if ctx.distributed and partial is not None:
        sharding.barrier(ctx)  # rank 0 has written the output: the rank files can go
        partial.unlink(missing_ok=True)
    return results, failures


def _single_point(atoms: Any, out: dict[str, Any]) -> Any:
    from ase.calculators.singlepoint import SinglePointCalculator

    return SinglePointCalculator(atoms, energy=out["energy"], forces=out["forces"])


def _predict_chunk(
    model: Any, dataset: Sequence[Any], indices: range, dtype: Any, device: Any, failures: list, source: Path
) -> list[tuple[int, Any, dict[str, Any]]]:
    """``(index, atoms, {"energy", "forces"})`` for the structures of ``indices`` the model
    can take; the others are appended to ``failures`` (and reported on stderr). A batch that
    fails is retried structure by structure, to name the culprit and keep the rest."""
    chunk = []
    for index in indices:
        try:
            chunk.append((index, dataset[index]))
        except Exception as err:  # noqa: BLE001 - a bad record must not stop the others
            _fail(failures, index, err, source)
    if not chunk:
        return []
    try:
        return _predict_batch(model, chunk, dtype, device)
    except Exception as err:  # noqa: BLE001 - one structure's failure must not lose the others
        if len(chunk) == 1:
            _fail(failures, chunk[0][0], err, source)
            return []
    out = []
    for item in chunk:
        try:
            out.extend(_predict_batch(model, [item], dtype, device))
        except Exception as err:  # noqa: BLE001
            _fail(failures, item[0], err, source)
    return out


def _predict_batch(model: Any, chunk: list[tuple[int, Any]], dtype: Any, device: Any) -> list[tuple[int, Any, dict]]:
    import numpy as np
    import torch

    from ..data.batch import AtomicBatch

    batch = AtomicBatch.from_atoms([atoms for _, atoms in chunk], dtype=dtype, device=device)
    with torch.no_grad():
        out = model(batch)
    energies = out["energy"].detach().double().cpu().numpy().reshape(-1)
    forces = np.split(out["forces"].detach().double().cpu().numpy(), np.cumsum(batch.natoms.cpu().numpy())[:-1])
    results = []
    for k, (index, atoms) in enumerate(chunk):
        if not (np.isfinite(energies[k]) and np.isfinite(forces[k]).all()):
            raise ValueError(f"structure {k}: the model predicts a non-finite energy or forces")
        results.append((index, atoms, {"energy": float(energies[k]), "forces": forces[k]}))
    return results


_BATCH_PREFIX = re.compile(r"^structure 0: ")  # a one-structure batch's own numbering


def _fail(failures: list, index: int, err: BaseException, source: Path) -> None:
    message = _BATCH_PREFIX.sub("", one_line(err))
    failures.append({"index": index, "error": message})
    print(f"scn predict: {describe_failure(source, index, message)}", file=sys.stderr)

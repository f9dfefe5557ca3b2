"""``scn relax``: relax structures with a model, batched (``simulation.engine``) or with ASE."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["add_parser"]

EPILOG = """\
examples:
  scn relax runs/demo/checkpoints/best.pt initial.extxyz -o relaxed.extxyz
  scn relax scn_oc20.pt slabs.traj --optimizer FIRE --fmax 0.03 --trajectory-dir trajs/
  scn relax best.pt slabs.extxyz --engine ase --optimizer BFGS     # one ASE optimiser per structure
  torchrun --standalone --nproc_per_node=4 $(which scn) relax best.pt slabs.extxyz --device cuda   # 4 GPUs

under torchrun each process relaxes its share (structures dealt round-robin) and rank 0 writes
the output in input order, the same as one process writes; a run that stops keeps each rank's
share in STEM.rankR-of-W.extxyz and STEM.rankR-of-W.json.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``scn relax``."""
    from .common import add_relax_engine_arguments, add_trust_pickle_argument

    p = subparsers.add_parser(
        "relax",
        help="relax structures with a model (fixed atoms stay fixed)",
        description=(
            "Relax every structure of STRUCTURES with the model in CHECKPOINT (this package's "
            "checkpoints or official OC20 ones). By default many structures share each model call "
            "(the batched engine; FIRE and LBFGS as ASE defines them, finished structures leave the "
            "batch and waiting ones enter); --engine ase runs one ASE optimiser per structure. Atoms fixed by a "
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
    add_relax_engine_arguments(p)
    p.add_argument("--fmax", type=float, default=0.05, help="force convergence criterion, eV/A (default 0.05)")
    p.add_argument("--steps", type=int, default=200, help="maximum optimiser steps (default 200)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rotation-average", type=int, default=0, help="average over N random rotations")
    add_trust_pickle_argument(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import torch

    from .. import sharding
    from ..simulation import SCNCalculator
    from .common import load_checkpoint_model, one_line, open_input_structures, prepare_output, resolve_relax_engine

    if not args.fmax > 0 or args.steps < 0:
        raise SystemExit(f"scn relax: need --fmax > 0 and --steps >= 0, got {args.fmax} and {args.steps}")
    resolve_relax_engine("relax", args)
    if args.output.suffix == ".json":
        raise SystemExit(f"scn relax: -o {args.output}: the summary is written next to the output as .json; "
                         "give the relaxed structures another suffix (.extxyz)")
    ctx = sharding.join("relax", args.device)  # under torchrun: this rank's device
    device = ctx.device
    _, model = load_checkpoint_model("relax", args.checkpoint, device=device, dtype=torch.float32,
                                     trust_pickle=args.trust_pickle)
    try:
        calculator = SCNCalculator(model, device=device, rotation_average=args.rotation_average)
    except ValueError as err:
        raise SystemExit(f"scn relax: {args.checkpoint}: {one_line(err)}") from None
    if args.engine == "batched":
        calculator = model  # the engine calls the model itself
    structures = open_input_structures("relax", args.structures, trust_pickle=args.trust_pickle)
    prepare_output("relax", args.output)
    with sharding.interruptible(ctx):
        results = _relax_all(args, structures, calculator, ctx)
    if ctx.is_main and not args.quiet:
        print(f"{'#':>4} {'converged':>9} {'steps':>5} {'energy / eV':>14} {'max|F| / eV/A':>14}")
        for r in results:
            if "error" in r:
                print(f"{r['index']:>4} {'failed':>9}  {r['error']}")
            else:
                print(f"{r['index']:>4} {str(r['converged']):>9} {r['steps']:>5} {r['energy']:>14.5f} "
                      f"{r['max_force']:>14.4f}")
        print(f"relaxed structures: {args.output}; summary: {args.output.with_suffix('.json')}")
    failed = [r for r in results if "error" in r]
    message = None
    if failed:
        from .common import describe_failure

        first = describe_failure(args.structures, failed[0]["index"], failed[0]["error"])
        message = (f"scn relax: {len(failed)} of {len(structures)} structures failed (first: {first}); "
                   f"the others are in {args.output}")
    sharding.finish(ctx, message)  # every rank exits as rank 0 does
    return 0


def _relax_indices(
    indices: list[int], structures: Any, calculator: Any, args: argparse.Namespace, ctx: Any,
    done: Callable[[int, dict, Any], None],
) -> list[tuple[dict, Any]]:
    """Relax the structures of ``indices``: ``(summary record, relaxed atoms or None if it
    failed)`` per index, in the same order; ``done(index, record, atoms)`` is called as each
    one is finished, so that it can be saved at once. A failing structure is reported and
    gives a record with its ``"error"``. ``calculator`` is the model for the batched engine."""
    if args.engine == "batched":
        return _relax_batched(indices, structures, calculator, args, ctx, done)
    from ..simulation import relax
    from ..sharding import progress
    from .common import describe_failure, one_line

    outcomes = []
    for index in progress(indices, ctx, desc="relax", unit="structure", disable=args.quiet):
        trajectory = args.trajectory_dir / f"{index:05d}.traj" if args.trajectory_dir else None
        try:
            result = relax(structures[index], calculator, args.optimizer, args.fmax, args.steps, trajectory)
        except Exception as err:  # noqa: BLE001 - report it, go on with the others
            message = one_line(err)
            outcome = ({"index": index, "error": message}, None)
            print(f"scn relax: failed: {describe_failure(args.structures, index, message)}", file=sys.stderr)
        else:
            # the output skips failed structures: each frame says which input it came from
            result.atoms.info["source_index"] = index
            outcome = ({"index": index, "converged": result.converged, "steps": result.steps,
                        "energy": result.energy, "max_force": result.max_force}, result.atoms)
        done(index, *outcome)
        outcomes.append(outcome)
    return outcomes


def _relax_batched(
    indices: list[int], structures: Any, model: Any, args: argparse.Namespace, ctx: Any,
    done: Callable[[int, dict, Any], None],
) -> list[tuple[dict, Any]]:
    """:func:`_relax_indices` with the batched engine (one progress bar for this rank)."""
    from ..simulation import relax_many
    from .common import describe_failure, one_line

    by_index: dict[int, tuple[dict, Any]] = {}

    def failed(index: int, message: str) -> None:
        print(f"scn relax: failed: {describe_failure(args.structures, index, message)}", file=sys.stderr)
        by_index[index] = ({"index": index, "error": message}, None)
        done(index, *by_index[index])

    loaded: list[int] = []
    work: list[Any] = []
    for index in indices:  # a structure the file cannot give fails alone, as in the ASE loop
        try:
            work.append(structures[index])
        except Exception as err:  # noqa: BLE001
            failed(index, one_line(err))
        else:
            loaded.append(index)

    def finished(outcome: Any) -> None:
        index = loaded[outcome.index]
        if outcome.error is not None:
            failed(index, outcome.error)
            return
        else:
            atoms = outcome.atoms
            atoms.info["source_index"] = index
            record = {"index": index, "converged": outcome.converged, "steps": outcome.steps,
                      "energy": outcome.energy, "max_force": outcome.max_force}
        by_index[index] = (record, atoms)
        done(index, record, atoms)

    trajectories = [args.trajectory_dir / f"{index:05d}.traj" for index in loaded] if args.trajectory_dir else None
    if work:
        relax_many(work, model, optimizer=args.optimizer, fmax=args.fmax, steps=args.steps,
                   max_atoms=args.batch_atoms, device=ctx.device, trajectories=trajectories,
                   progress=not args.quiet, on_finish=finished)
    return [by_index[index] for index in indices]


def _relax_all(args: argparse.Namespace, structures: Any, calculator: Any, ctx: Any) -> list[dict]:
    """Relax this rank's share of ``structures`` and, on rank 0, return every structure's
    summary record in input order (an empty list on the other ranks), having written the
    relaxed structures to ``args.output`` and the records to its ``.json``.

    Each relaxed structure is appended to a partial file as soon as it is done, and whatever
    happens later (a failing structure, an interruption) the ones relaxed are kept. In a
    plain run that file becomes the output (with the summary of what was done). Under
    ``torchrun`` each rank streams its share to ``.NAME.rankR-of-W.partial``; when all are
    done, rank 0 writes the output from the results it gathers, in input order, and the rank
    files are removed. A sharded run that stops early leaves each rank's share (frames in any
    order, each with its ``source_index``) in ``STEM.rankR-of-W.extxyz`` with its summary in
    ``STEM.rankR-of-W.json``; a rank killed outright leaves its hidden ``.partial`` file.
    """
    from .. import sharding
    from ..data.formats.extxyz import ExtxyzWriter
    from .common import write_json

    summary = args.output.with_suffix(".json")
    partial = sharding.partial_path(args.output, ctx)
    writer = ExtxyzWriter(partial)  # exact floats, FixAtoms as move_mask
    records: list[dict] = []  # this rank's, in the order it relaxed them

    def done(index: int, record: dict, atoms: Any) -> None:
        if atoms is not None:
            writer.write(atoms)
        records.append(record)

    def work(indices: list[int]) -> list[tuple[dict, Any]]:
        outcomes = _relax_indices(indices, structures, calculator, args, ctx, done)
        # a plain run's partial file is its output already: no need to hold the structures
        return outcomes if ctx.distributed else [(record, None) for record, _ in outcomes]

    interrupted = True
    try:
        outcomes = sharding.run_share(work, len(structures), ctx)
        writer.close()  # before waiting for the others: this rank's share is safe on disk
        if not ctx.distributed:
            # the batched engine finishes out of order; the file holds one frame per record
            # without an error, in the order of the records
            _put_in_input_order(partial, [r["index"] for r in records if "error" not in r])
            records.sort(key=lambda r: r["index"])
            interrupted = False
            return records
        results = _write_in_order(args.output, sharding.gather_in_order(outcomes, len(structures), ctx), ctx)
        sharding.barrier(ctx)  # the output is written: the rank files can go
        partial.unlink(missing_ok=True)
        interrupted = False
        return results
    finally:
        writer.close()
        if ctx.distributed:
            if interrupted:
                _keep_share(args.output, partial, records, ctx, len(structures))
        elif interrupted and not records:  # nothing done: leave any earlier output as it was
            partial.unlink(missing_ok=True)
        else:
            partial.replace(args.output)
            write_json(summary, records)
            if interrupted:
                relaxed = sum("error" not in r for r in records)
                print(f"scn relax: stopped after {len(records)} of {len(structures)} structures; the {relaxed} "
                      f"relaxed are in {args.output}, the summary in {summary}", file=sys.stderr)


def _put_in_input_order(path: Path, order: list[int]) -> None:
    """Rewrite the relaxed structures in ``path``, whose frames are the inputs ``order``, in
    input order if they are not already: the frames' bytes are moved as they are, and the file
    is replaced only once the sorted copy is complete."""
    from ..data.formats.extxyz import index_frames

    if order == sorted(order):
        return
    offsets = index_frames(path)
    staged = path.with_name(path.name + ".sorted")
    with open(path, "rb") as source, open(staged, "wb") as target:
        for k in sorted(range(len(order)), key=order.__getitem__):
            source.seek(int(offsets[k]))
            target.write(source.read(int(offsets[k + 1]) - int(offsets[k])))
    staged.replace(path)


def _write_in_order(output: Path, gathered: Any, ctx: Any) -> list[dict]:
    """Rank 0 writes the relaxed structures it is handed (in input order) to ``output`` and
    the records to its ``.json``, and returns the records; the other ranks only send theirs."""
    from .. import sharding
    from ..data.formats.extxyz import ExtxyzWriter
    from .common import write_json

    if not ctx.is_main:
        for _ in gathered:
            pass
        return []
    staged = sharding.partial_path(output, None)  # the plain run's partial name
    records = []
    try:
        with ExtxyzWriter(staged, label=output) as writer:
            for _, (record, atoms) in gathered:
                if atoms is not None:
                    writer.write(atoms)
                records.append(record)
    except BaseException:  # the ranks keep their shares (see _keep_share): no half output
        staged.unlink(missing_ok=True)
        raise
    staged.replace(output)
    write_json(output.with_suffix(".json"), records)
    return records


def _keep_share(output: Path, partial: Path, records: list[dict], ctx: Any, total: int) -> None:
    """A sharded run stopped before rank 0 wrote the output: keep this rank's relaxed
    structures and its summary under visible names, and say where."""
    from .. import sharding
    from .common import write_json

    if not records:
        partial.unlink(missing_ok=True)
        return
    kept, kept_summary = sharding.kept_path(output, ctx), sharding.kept_path(output, ctx, ".json")
    partial.replace(kept)
    write_json(kept_summary, records)
    relaxed = sum("error" not in r for r in records)
    print(f"scn relax: rank {ctx.rank} of {ctx.world_size} stopped after {len(records)} of the {total} structures "
          f"(its share: {len(sharding.shard_indices(total, ctx.rank, ctx.world_size))}); the {relaxed} it relaxed "
          f"are in {kept}, its summary in {kept_summary}", file=sys.stderr)

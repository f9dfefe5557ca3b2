"""``scn md``: molecular dynamics (NVE or Langevin NVT) with a model."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_parser"]

EPILOG = """\
examples:
  scn md model.pt slab.extxyz --steps 2000 --timestep 0.5 --temperature 300 --dtype float64
  scn md model.pt slab.extxyz --ensemble nvt --temperature 500 --friction 0.01 --trajectory hot.traj
  scn md model.pt slabs.extxyz --ensemble nvt --replicas 4 --output-dir runs/md/

one structure (a file of one, or --index) runs with ASE's integrators and writes --trajectory
(default md.traj) and --log (default: the trajectory's name with .log); several structures or
--replicas > 1 run together in one batched integrator, writing DIR/NNNNN.traj and DIR/NNNNN.log
(DIR/NNNNN_rR.* for replicas) and DIR/summary.json. The log is a table with the columns
time_fs temperature_K epot_eV ekin_eV etot_eV; the drift printed at the end is
(Etot_last - Etot_first) / atoms over it.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``scn md``."""
    from .common import add_trust_pickle_argument

    p = subparsers.add_parser(
        "md",
        help="molecular dynamics (NVE velocity Verlet, NVT Langevin) with a model",
        description=(
            "Run molecular dynamics with the model in CHECKPOINT on STRUCTURES: NVE (velocity "
            "Verlet) or NVT (Langevin). Initial velocities are drawn from a Maxwell-Boltzmann "
            "distribution at --initial-temperature (default --temperature), unless "
            "--keep-velocities. Atoms fixed by FixAtoms (or move_mask) stay in place and are not "
            "counted in the temperature. Each run writes a trajectory and a log with a progress "
            "bar; at the end the steps, the mean temperature and the total-energy drift per atom "
            "are printed. A model with direct forces does not conserve energy: a warning says so. "
            "Outputs are never overwritten, and an interrupted run keeps what it wrote."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint")
    p.add_argument("structures", help="any data set file (extxyz, .db, .aselmdb, OC20 .lmdb) or ASE-readable file")
    p.add_argument("--ensemble", choices=("nve", "nvt"), default="nve")
    p.add_argument("--temperature", type=float, default=300.0,
                   help="thermostat temperature (NVT) and default initial temperature, K (default 300)")
    p.add_argument("--initial-temperature", type=float,
                   help="temperature of the initial Maxwell-Boltzmann velocities, K (default --temperature)")
    p.add_argument("--keep-velocities", action="store_true",
                   help="start from the velocities stored with the structures instead")
    p.add_argument("--timestep", type=float, default=0.5, help="time step, fs (default 0.5)")
    p.add_argument("--steps", type=int, default=1000, help="integration steps (default 1000)")
    p.add_argument("--friction", type=float, default=0.01,
                   help="Langevin friction, 1/fs (default 0.01 = 10/ps; ASE's friction is this / ase.units.fs)")
    p.add_argument("--replicas", type=int, default=1,
                   help="independent runs per structure, with different seeds (default 1)")
    p.add_argument("--index", type=int, help="run only this structure of the file (0-based; default all)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--trajectory", type=Path, help="trajectory of a single run (default md.traj)")
    out.add_argument("--output-dir", type=Path, help="directory for the trajectories and logs (default md/ for "
                                                     "several runs)")
    p.add_argument("--log", type=Path, help="log of a single run (default: the trajectory with .log)")
    p.add_argument("--log-interval", type=int, default=10,
                   help="log and trajectory every N steps, and the last step (default 10)")
    p.add_argument("--seed", type=int, default=0, help="initial velocities and Langevin noise; run k gets seed + k")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="model precision (the integrator state is float64); float64 for NVE energy conservation")
    add_trust_pickle_argument(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=_run)


def _check_arguments(args: argparse.Namespace) -> None:
    problems = []
    if not (math.isfinite(args.timestep) and args.timestep > 0):
        problems.append(f"--timestep must be > 0 fs, got {args.timestep}")
    if args.steps < 0:
        problems.append(f"--steps must be >= 0, got {args.steps}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        problems.append(f"--temperature must be >= 0 K, got {args.temperature}")
    if args.initial_temperature is not None:
        if not (math.isfinite(args.initial_temperature) and args.initial_temperature >= 0):
            problems.append(f"--initial-temperature must be >= 0 K, got {args.initial_temperature}")
        if args.keep_velocities:
            problems.append("--initial-temperature and --keep-velocities exclude each other")
    if args.ensemble == "nvt" and not (math.isfinite(args.friction) and args.friction > 0):
        problems.append(f"--friction must be > 0 (1/fs) for NVT, got {args.friction}")
    if args.replicas < 1:
        problems.append(f"--replicas must be >= 1, got {args.replicas}")
    if args.log_interval < 1:
        problems.append(f"--log-interval must be >= 1, got {args.log_interval}")
    if args.index is not None and args.index < 0:
        problems.append(f"--index must be >= 0, got {args.index}")
    if args.keep_velocities and args.replicas > 1 and args.ensemble == "nve":
        problems.append("--keep-velocities with --replicas > 1 in NVE gives identical runs; draw velocities instead")
    if problems:
        raise SystemExit("scn md: " + "; ".join(problems))


def _outputs(args: argparse.Namespace, runs: list[tuple[int, int]]) -> list[tuple[Path, Path]]:
    """``(trajectory, log)`` of each run ``(structure index, replica)``, refusing existing files."""
    batched = len(runs) > 1
    if batched and args.trajectory is not None:
        raise SystemExit(f"scn md: --trajectory names one file, but there are {len(runs)} runs; use --output-dir")
    if batched and args.log is not None:
        raise SystemExit(f"scn md: --log names one file, but there are {len(runs)} runs; use --output-dir")
    if not batched and args.output_dir is None:
        trajectory = args.trajectory if args.trajectory is not None else Path("md.traj")
        log = args.log if args.log is not None else trajectory.with_suffix(".log")
        if trajectory.resolve() == log.resolve():
            raise SystemExit(f"scn md: the trajectory and the log are the same file {trajectory}")
        paths = [(trajectory, log)]
    else:
        if args.log is not None:
            raise SystemExit("scn md: --log names the log of a --trajectory; with --output-dir the logs go there")
        directory = args.output_dir if args.output_dir is not None else Path("md")
        if directory.exists() and not directory.is_dir():
            raise SystemExit(f"scn md: --output-dir {directory} is a file")
        if len(runs) > 1 and (directory / "summary.json").exists():
            raise SystemExit(f"scn md: {directory / 'summary.json'} exists; remove it or choose another --output-dir")
        paths = []
        for index, replica in runs:
            stem = f"{index:05d}" if args.replicas == 1 else f"{index:05d}_r{replica}"
            paths.append((directory / f"{stem}.traj", directory / f"{stem}.log"))
    for trajectory, log in paths:
        for path in (trajectory, log):
            if path.exists():
                raise SystemExit(f"scn md: {path} exists; remove it or choose another output (outputs are never "
                                 "overwritten)")
    return paths


def _run(args: argparse.Namespace) -> int:
    import warnings

    import torch

    from ..simulation.md import DIRECT_FORCES_MESSAGE, DirectForcesWarning
    from .common import check_device, load_checkpoint_model, open_input_structures, prepare_output

    _check_arguments(args)
    device = check_device("md", args.device)
    _, model = load_checkpoint_model("md", args.checkpoint, device=device, dtype=getattr(torch, args.dtype),
                                     trust_pickle=args.trust_pickle)
    if not getattr(model, "regress_forces", True):
        raise SystemExit(f"scn md: {args.checkpoint}: the model does not predict forces")
    structures = open_input_structures("md", args.structures, trust_pickle=args.trust_pickle)
    if args.index is not None and args.index >= len(structures):
        raise SystemExit(f"scn md: --index {args.index}: {args.structures} holds {len(structures)} structures")
    indices = [args.index] if args.index is not None else list(range(len(structures)))
    runs = [(index, replica) for index in indices for replica in range(args.replicas)]
    paths = _outputs(args, runs)
    atoms_list = [_read(structures, index, args.structures) for index, _ in runs]
    options = dict(ensemble=args.ensemble, timestep_fs=args.timestep, steps=args.steps,
                   temperature_K=args.temperature, friction_per_fs=args.friction,
                   initial_temperature_K=None if args.keep_velocities else (
                       args.initial_temperature if args.initial_temperature is not None else args.temperature),
                   log_interval=args.log_interval, progress=not args.quiet)
    if args.keep_velocities:
        missing = sorted({index for (index, _), atoms in zip(runs, atoms_list) if not atoms.has("momenta")})
        if missing:
            raise SystemExit(f"scn md: --keep-velocities: structures {missing[:10]} of {args.structures} have no "
                             "velocities (momenta)")
    for trajectory, log in paths:
        prepare_output("md", trajectory)
        prepare_output("md", log)
    if getattr(model, "conservative", True) is False:
        print(f"scn md: warning: {DIRECT_FORCES_MESSAGE}", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DirectForcesWarning)  # printed above, once
        if len(runs) == 1:
            return _single(args, model, device, atoms_list[0], runs[0][0], paths[0], options)
        return _batched(args, model, atoms_list, runs, paths, options)


def _read(structures: Any, index: int, source: Any) -> Any:
    from .common import describe_failure, one_line

    try:
        return structures[index].copy()
    except Exception as err:  # noqa: BLE001 - a bad record is the file's fault
        raise SystemExit(f"scn md: {describe_failure(source, index, one_line(err))}") from None


def _single(args: argparse.Namespace, model: Any, device: Any, atoms: Any, index: int, paths: tuple[Path, Path],
            options: dict) -> int:
    import torch

    from ..simulation.calculator import SCNCalculator
    from ..simulation.md import MDError, run_md
    from .common import describe_failure, one_line

    trajectory, log = paths
    calculator = SCNCalculator(model, device=device, dtype=getattr(torch, args.dtype))
    try:
        result = run_md(atoms, calculator, seed=args.seed, trajectory=trajectory, logfile=log, **options)
    except MDError as err:
        raise SystemExit(f"scn md: {describe_failure(args.structures, index, one_line(err))}; the trajectory and "
                         f"log until then are in {trajectory} and {log}") from None
    except KeyboardInterrupt:
        print(f"scn md: interrupted; the trajectory and log so far are in {trajectory} and {log}", file=sys.stderr)
        raise
    except ValueError as err:  # refused before any step: every atom fixed, a zero mass...
        raise SystemExit(f"scn md: {describe_failure(args.structures, index, one_line(err))}") from None
    if not args.quiet:
        _print_single(args, result)
    return 0


def _print_single(args: argparse.Namespace, result: Any) -> None:
    from ..simulation.md import block_average

    print(f"md {args.ensemble}: {result.steps} steps of {args.timestep:g} fs ({result.steps * args.timestep:g} fs), "
          f"{result.num_atoms} atoms")
    print(f"mean temperature: {result.mean_temperature_K:.2f} K" + _second_half(result, block_average, args))
    print(f"total-energy drift: {result.drift_per_atom:.6e} eV/atom "
          f"(max |Etot - Etot0|: {result.max_deviation_per_atom:.6e} eV/atom)")
    print(f"trajectory: {result.trajectory}; log: {result.logfile}")


def _second_half(result: Any, block_average: Any, args: argparse.Namespace) -> str:
    """For NVT: the mean over the second half with its block-average error, if long enough."""
    if args.ensemble != "nvt":
        return ""
    half = result.temperature_K[len(result.temperature_K) // 2:]
    if len(half) < 16:
        return f" (target {args.temperature:g} K)"
    mean, error = block_average(half)
    return f"; second half {mean:.2f} +- {error:.2f} K (target {args.temperature:g} K)"


def _batched(args: argparse.Namespace, model: Any, atoms_list: list, runs: list[tuple[int, int]],
             paths: list[tuple[Path, Path]], options: dict) -> int:
    from ..simulation.md import MDError, md_many
    from .common import describe_failure, naming, one_line, write_json

    directory = paths[0][0].parent
    summary = directory / "summary.json"
    try:
        results = md_many(atoms_list, model, seed=[args.seed + k for k in range(len(runs))],
                          trajectories=[t for t, _ in paths], logfiles=[log for _, log in paths], **options)
    except KeyboardInterrupt:
        print(f"scn md: interrupted; the trajectories and logs so far are in {directory}", file=sys.stderr)
        raise
    except MDError as err:
        raise SystemExit(f"scn md: {one_line(err)}; the trajectories and logs until then are in {directory}") from None
    except ValueError as err:  # refused before any step
        raise SystemExit(f"scn md: {naming(args.structures, one_line(err))}") from None
    records = []
    for (index, replica), result in zip(runs, results):
        record = {"index": index, "replica": replica, "natoms": result.num_atoms, "steps": result.steps,
                  "trajectory": str(result.trajectory), "log": str(result.logfile)}
        if len(result.etot_eV):
            record.update(mean_temperature_K=result.mean_temperature_K, drift_per_atom=result.drift_per_atom,
                          max_deviation_per_atom=result.max_deviation_per_atom)
        if result.error:
            record["error"] = result.error
        records.append(record)
    write_json(summary, {"ensemble": args.ensemble, "timestep_fs": args.timestep, "temperature_K": args.temperature,
                         "runs": records})
    if not args.quiet:
        print(f"md {args.ensemble}: {len(runs)} runs, {args.steps} steps of {args.timestep:g} fs")
        print(f"{'#':>5} {'replica':>7} {'atoms':>5} {'steps':>6} {'T_mean/K':>9} {'drift/(eV/atom)':>16} "
              f"{'max|dEtot|/(eV/atom)':>21}")
        for r in records:
            if "drift_per_atom" in r:
                line = (f"{r['index']:>5} {r['replica']:>7} {r['natoms']:>5} {r['steps']:>6} "
                        f"{r['mean_temperature_K']:>9.2f} {r['drift_per_atom']:>16.6e} {r['max_deviation_per_atom']:>21.6e}")
            else:
                line = f"{r['index']:>5} {r['replica']:>7} {r['natoms']:>5} {r['steps']:>6}"
            print(line + (f"  failed: {r['error']}" if "error" in r else ""))
        print(f"trajectories and logs: {directory}; summary: {summary}")
    failed = [r for r in records if "error" in r]
    if failed:
        raise SystemExit(f"scn md: {len(failed)} of {len(runs)} runs stopped early (first: "
                         f"{describe_failure(args.structures, failed[0]['index'], failed[0]['error'])}); the others ran")
    return 0

"""Relaxation throughput: the batched engine against one ASE optimiser per structure.

    python benchmarks/bench_relax.py --data DIR (scn data generate DIR --size small)
        [--checkpoint best.pt | --config configs/small/scn_small_conservative.yaml]
        [--structures 200] [--optimizer LBFGS] [--fmax 0.05] [--steps 200] [--threads 1]
        [--device cpu|cuda] [--engines batched,ase] [--batch-atoms N] [--chunk 50]

Relaxes the same IS2RS structures (the ``is2re/*.extxyz`` files of generated data, in split
order) with the same model, optimiser and settings through
:func:`~spherical_channels.evaluation.evaluate.evaluate_relaxations`: the batched engine
(``relax_many``: many structures per model call) and the per-structure ASE loop (ASE's own
optimiser on ``SCNCalculator``). Both paths include the model's energy at the initial
structures (the unrelaxed IS2RE baseline). Prints one JSON line per engine: structures per
second, atom-steps per second (sum of atoms x optimiser steps over the wall time), mean
steps, converged fraction and the IS2RS/IS2RE metrics with the unrelaxed rows, then one line
with the speed ratios. Without ``--checkpoint`` the model has random weights (seeded).

The engines take turns on chunks of ``--chunk`` structures (A B, then B A, ...), so that a
shared machine's changing load falls on both alike; the batched engine refills its batch only
within a chunk, which costs it a little at each chunk's tail.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from ase.calculators.emt import EMT

from spherical_channels.data.formats.extxyz import ExtxyzReader
from spherical_channels.evaluation.evaluate import evaluate_relaxations, relaxation_metrics
from spherical_channels.models.checkpoint import load_model
from spherical_channels.models.scn import SCN
from spherical_channels.simulation import SCNCalculator
from spherical_channels.testing.scn import read_model_options


def _structures(data: Path, count: int) -> list:
    files = sorted((data / "is2re").glob("*.extxyz"))
    if not files:
        raise SystemExit(f"{data}: no is2re/*.extxyz (make it with: scn data generate {data} --size small)")
    frames = []
    for path in files:
        reader = ExtxyzReader(path)
        frames.extend(reader.read(k) for k in range(len(reader)))
        if len(frames) >= count:
            break
    return frames[:count]


def _metrics(out: dict) -> dict:
    keep = {"is2re": ("energy_mae", "ewt"), "is2rs": ("adwt", "adwt_adsorbate", "afbt")}
    row = {f"{group}_{k}": out[group].get(k) for group, keys in keep.items() for k in keys if group in out}
    row.update({f"unrelaxed_{group}_{k}": out["unrelaxed"][group].get(k)
                for group, keys in keep.items() for k in keys if group in out.get("unrelaxed", {})})
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a directory written by scn data generate")
    p.add_argument("--checkpoint", help="a trained checkpoint")
    p.add_argument("--config", default="configs/small/scn_small_conservative.yaml",
                   help="without --checkpoint: a training YAML whose model: section builds a random-weight model")
    p.add_argument("--structures", type=int, default=200)
    p.add_argument("--optimizer", choices=("FIRE", "LBFGS"), default="LBFGS")
    p.add_argument("--fmax", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--engines", default="batched,ase", help="comma-separated, run in this order")
    p.add_argument("--batch-atoms", type=int, default=None)
    p.add_argument("--no-reference", action="store_true", help="skip the EMT forces for AFbT")
    p.add_argument("--chunk", type=int, default=50, help="structures per turn of each engine (0: all at once)")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    if args.checkpoint:
        model = load_model(args.checkpoint, device=args.device)
    else:
        torch.manual_seed(0)
        model = SCN(**read_model_options(args.config)).to(args.device).eval()
    structures = _structures(args.data, args.structures)
    atoms = sum(len(a) for a in structures)
    reference = None if args.no_reference else EMT
    engines = args.engines.split(",")
    calculators = {e: model if e == "batched" else SCNCalculator(model, device=args.device) for e in engines}
    chunk = args.chunk if args.chunk > 0 else len(structures)
    seconds = dict.fromkeys(engines, 0.0)
    records: dict[str, list] = {e: [] for e in engines}
    for turn, start in enumerate(range(0, len(structures), chunk)):
        part = structures[start:start + chunk]
        for engine in engines if turn % 2 == 0 else engines[::-1]:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            began = time.perf_counter()
            out = evaluate_relaxations(calculators[engine], part, args.optimizer, args.fmax, args.steps,
                                       reference_calculator=reference, progress=True, batch_atoms=args.batch_atoms)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds[engine] += time.perf_counter() - began
            records[engine].extend({**r, "index": r["index"] + start} for r in out["relaxations"])
    rows = {}
    for engine in engines:
        out = relaxation_metrics(records[engine])
        done = [r for r in out["relaxations"] if "error" not in r]
        atom_steps = sum(len(structures[r["index"]]) * r["steps"] for r in done)
        rows[engine] = {
            "engine": engine, "optimizer": args.optimizer, "device": args.device, "threads": args.threads,
            "structures": len(structures), "atoms": atoms, "chunk": chunk, "failed": out["num_failed"],
            "seconds": seconds[engine], "structures_per_s": len(structures) / seconds[engine],
            "atom_steps_per_s": atom_steps / seconds[engine], "mean_steps": out["mean_steps"],
            "converged_fraction": out["converged_fraction"], **_metrics(out),
        }
        print(json.dumps(rows[engine]), flush=True)
    if "batched" in rows and "ase" in rows:
        print(json.dumps({
            "batched_over_ase_structures_per_s": rows["batched"]["structures_per_s"] / rows["ase"]["structures_per_s"],
            "batched_over_ase_atom_steps_per_s": rows["batched"]["atom_steps_per_s"] / rows["ase"]["atom_steps_per_s"],
            "checkpoint": args.checkpoint or f"random weights ({args.config})",
        }))


if __name__ == "__main__":
    main()

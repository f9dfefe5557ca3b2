"""Smoothness of an SCN energy surface: one adsorbate atom moved along a straight line.

    python benchmarks/bench_smoothness.py CHECKPOINT [CHECKPOINT ...] [--structures FILE]
        [--count 10] [--length 1.0] [--step 0.0025]

For each of ``--count`` structures with an adsorbate (tag 2) in ``--structures`` (default: the
built-in example structures), the first adsorbate atom is moved ``--length`` Å along x in steps
of ``--step`` Å, and the energy is evaluated at every point. A smooth surface changes by about
the same amount per step; a discontinuity (a neighbour entering a capped list, a resolution or
frame switch) shows as one step far above the median. Prints one JSON line per checkpoint: per
structure the largest step / median step (``max_over_median``, the relaxation issue's measure),
and the largest local jump / median step (``jump_over_median``): a step's departure from the mean
of its two neighbours, ``|dE_i - (dE_{i-1} + dE_{i+1}) / 2|``. A path that climbs a repulsive
wall has large steps that grow smoothly (large ``max_over_median``, small jumps); a
discontinuity of size J is a local jump of about J.
"""

from __future__ import annotations

import argparse
import json
from importlib.resources import files

import numpy as np
import torch
from ase.io import read

from spherical_channels.data.batch import AtomicBatch
from spherical_channels.models.checkpoint import load_model


def path_energies(model, atoms, index: int, length: float, step: float, dtype: torch.dtype) -> np.ndarray:  # noqa: ANN001
    """Energies ``[steps + 1]`` with atom ``index`` moved ``length`` Å along x."""
    frames = []
    for t in np.arange(0.0, length + step / 2, step):
        moved = atoms.copy()
        moved.positions[index, 0] += t
        frames.append(moved)
    energies = []
    with torch.no_grad():
        for i in range(0, len(frames), 50):
            batch = AtomicBatch.from_atoms(frames[i : i + 50], dtype=dtype)
            energies.append(model.energy_terms(batch, batch.positions, batch.cell)["energy"].numpy())
    return np.concatenate(energies)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--structures", default=str(files("spherical_channels.resources") / "example_structures.extxyz"))
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--length", type=float, default=1.0, help="Å")
    p.add_argument("--step", type=float, default=0.0025, help="Å")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--trust-pickle", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    structures = [a for a in read(args.structures, ":") if 0 < list(a.get_tags()).count(2) < len(a)][: args.count]
    for path in args.checkpoints:
        model = load_model(path, dtype=torch.float64, trust_pickle=args.trust_pickle).eval()
        ratios, jumps, medians = [], [], []
        for atoms in structures:
            index = int(np.flatnonzero(atoms.get_tags() == 2)[0])
            signed = np.diff(path_energies(model, atoms, index, args.length, args.step, torch.float64))
            steps = np.abs(signed)
            local = np.abs(signed[1:-1] - 0.5 * (signed[:-2] + signed[2:]))
            ratios.append(float(steps.max() / np.median(steps)))
            jumps.append(float(local.max() / np.median(steps)))
            medians.append(float(np.median(steps)))
        print(json.dumps({
            "checkpoint": path, "smooth": bool(model.smooth), "direct_forces": bool(model.direct_forces),
            "structures": len(structures), "step_A": args.step, "length_A": args.length,
            "max_over_median": ratios, "largest_ratio": max(ratios),
            "jump_over_median": jumps, "largest_jump": max(jumps), "median_step_eV": medians,
        }), flush=True)


if __name__ == "__main__":
    main()

"""NVE energy drift of an SCN: ASE's VelocityVerlet on a slab with an adsorbate.

    python benchmarks/bench_md.py --config configs/small/scn_relax.yaml [--checkpoint run/best.pt]
        [--steps 10000] [--timestep 0.5] [--temperature 450]

Prints one JSON line: the drift of the total energy per atom (a least-squares line through
E_total(t), times the run's length), its largest excursion, and the time per step. Without
``--checkpoint`` the model has random weights (the drift then measures only whether the forces
are the gradient of a smooth energy, which is what the smooth variant fixes).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from ase import units
from ase.build import add_adsorbate, fcc111
from ase.constraints import FixAtoms
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
from ase.md.verlet import VelocityVerlet

from spherical_channels.models.checkpoint import load_model
from spherical_channels.models.scn import SCN
from spherical_channels.simulation.calculator import SCNCalculator
from spherical_channels.testing.scn import read_model_options


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="training YAML whose model: section builds a random-weight model")
    p.add_argument("--checkpoint", help="a trained checkpoint (instead of --config)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model option override (YAML value)")
    p.add_argument("--steps", type=int, default=10000)
    p.add_argument("--timestep", type=float, default=0.5, help="fs")
    p.add_argument("--temperature", type=float, default=450.0, help="K, initial Maxwell-Boltzmann")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    import yaml

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    overrides = dict(yaml.safe_load(item.replace("=", ": ", 1)) for item in args.set)
    if args.checkpoint:
        model = load_model(args.checkpoint, dtype=dtype, **overrides)
    else:
        torch.manual_seed(args.seed)
        model = SCN(**{**read_model_options(args.config), **overrides})
    if model.direct_forces:
        print("note: direct forces are not the gradient of the energy; the drift measures that", flush=True)
    atoms = fcc111("Cu", (3, 3, 3), vacuum=6.0)
    add_adsorbate(atoms, "O", 1.3, "fcc")
    atoms.set_constraint(FixAtoms(indices=[a.index for a in atoms if a.tag == 3]))
    atoms.calc = SCNCalculator(model, dtype=dtype)
    MaxwellBoltzmannDistribution(atoms, temperature_K=args.temperature, rng=np.random.default_rng(args.seed))
    Stationary(atoms)
    dyn = VelocityVerlet(atoms, timestep=args.timestep * units.fs)
    energies = []
    dyn.attach(lambda: energies.append(atoms.get_potential_energy() + atoms.get_kinetic_energy()), interval=1)
    start = time.perf_counter()
    dyn.run(args.steps)
    seconds = time.perf_counter() - start
    e = np.asarray(energies)
    t = np.arange(len(e)) * args.timestep
    slope = np.polyfit(t, e, 1)[0] if len(e) > 1 else 0.0
    n = len(atoms)
    print(json.dumps({
        "config": args.checkpoint or args.config, "overrides": overrides, "smooth": model.smooth,
        "direct_forces": model.direct_forces, "atoms": n, "steps": args.steps, "timestep_fs": args.timestep,
        "temperature_K": args.temperature, "drift_eV_per_atom": float(slope * t[-1] / n) if len(e) > 1 else 0.0,
        "max_excursion_eV_per_atom": float(np.abs(e - e[0]).max() / n), "seconds_per_step": seconds / max(args.steps, 1),
    }))


if __name__ == "__main__":
    main()

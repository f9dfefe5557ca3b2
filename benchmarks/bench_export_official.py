#!/usr/bin/env python
"""Inference of the benchmark configuration (``cfg_bench.json``, as ``compare_official.py``
measures it) eager against its AOTInductor artefact, on the same batches.

    OMP_NUM_THREADS=1 python benchmarks/bench_export_official.py [--steps 6] [--threads 1]

Builds the SCN of ``benchmarks/cfg_bench.json`` (seed 0, float32), exports it with
``export_model(format="aoti")`` traced on the benchmark's own batches, then alternates eager
(``model.eval()``, ``torch.no_grad()``, as ``bench_model.py``'s forward) and artefact calls on
the two batches of 4 fixture structures for ``--steps`` rounds. Prints one JSON line: export
time, per-batch minimum times of each, their ratio, and the largest force difference. Multiply
``compare_official.py``'s forward ratio by ``eager_over_aoti`` to compare the artefact with the
official code.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from ase.io import read

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> int:
    from bench_model import load_config

    from spherical_channels.data.batch import AtomicBatch
    from spherical_channels.deployment import export_model, load_exported
    from spherical_channels.models import SCN

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(HERE / "cfg_bench.json"))
    p.add_argument("--structures", default=str(HERE.parent / "tests/fixtures/structures_small.extxyz"))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = SCN(**load_config(args.config), eval_roll="fixed").eval()
    atoms = read(args.structures, ":")
    n, B = len(atoms), args.batch_size
    chunks = [[atoms[(k * B + t) % n] for t in range(B)] for k in range(max(1, math.ceil(n / B)))]
    batches = [AtomicBatch.from_atoms(c, dtype=torch.float32) for c in chunks]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.pt2"
        began = time.perf_counter()
        export_model(model, path, format="aoti", example=chunks[0] + chunks[-1])
        export_s = time.perf_counter() - began
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = load_exported(path, trust_pickle=True)
        times = {"eager": [[] for _ in batches], "aoti": [[] for _ in batches]}
        diff = 0.0
        for step in range(args.steps + 1):
            for k, batch in enumerate(batches):
                outs = {}
                for name, fn in (("eager", model), ("aoti", loaded)):
                    t = time.perf_counter()
                    with torch.no_grad():
                        outs[name] = fn(batch)
                    if step:  # the first round warms up
                        times[name][k].append(time.perf_counter() - t)
                diff = max(diff, float((outs["eager"]["forces"] - outs["aoti"]["forces"]).abs().max()))
    best = {name: sum(min(ts) for ts in per) for name, per in times.items()}
    print(json.dumps({
        "config": args.config, "threads": args.threads, "steps": args.steps, "export_s": export_s,
        "atoms_per_batch": [b.num_atoms for b in batches],
        "sum_per_batch_min_s": best, "eager_over_aoti": best["eager"] / best["aoti"],
        "max_abs_diff_forces": diff,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())

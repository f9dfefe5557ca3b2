#!/usr/bin/env python
"""Data-side throughput on CPU: radius graphs and dataset loading.

Example::

    python benchmarks/bench_data.py                 # everything, ~1 minute on 2 cores
    python benchmarks/bench_data.py --quick         # fewer structures and repeats

What is timed (``time.perf_counter``; min and median over ``--repeats``):

* ``graph_slabs``: ``build_graph(batch, cutoff=8.0, max_num_neighbors=40)`` over
  OC20-sized slabs (Cu/Pt fcc111 4x4x5 + an O/OH/CO adsorbate, ~80 atoms, periodic with
  vacuum), in batches of 8; structures/s.
* ``graph_bulk``: the same for one ~10,000-atom bulk fcc Cu cell, run in a fresh
  (spawned) process so that its peak RSS (``ru_maxrss``) is its own; the process's RSS
  after imports and building the batch is reported next to it.
* ``read_<fmt>``: ``ds[i]`` over the whole dataset, with and without validation.
* ``loader_<fmt>_w<k>``: one epoch of ``DataLoader(ds, batch_size=8, num_workers=k,
  collate_fn=AtomicBatch.from_atoms)`` (float32); for k > 0 with persistent workers and
  one untimed warm-up epoch, so worker start-up is not counted.

The slab dataset is written to a temporary directory as extxyz and (``--aselmdb``,
default on) aselmdb. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

CUTOFF = 8.0
MAX_NEIGHBORS = 40
BATCH_SIZE = 8
# Bulk fcc Cu, 4 atoms per cubic cell: 14 x 14 x 13 cells = 10,192 atoms.
BULK_REPEAT = (14, 14, 13)
ADSORBATES = ("O", "OH", "CO")


def make_slabs(count: int, seed: int = 0) -> list:
    """~80-atom fcc111 slabs with an adsorbate, random perturbations and fake targets."""
    import numpy as np
    from ase.build import add_adsorbate, fcc111, molecule
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.constraints import FixAtoms

    rng = np.random.default_rng(seed)
    slabs = []
    for k in range(count):
        slab = fcc111(("Cu", "Pt")[k % 2], size=(4, 4, 5), vacuum=8.0, periodic=True)
        ads = ADSORBATES[k % len(ADSORBATES)]
        add_adsorbate(slab, molecule(ads) if len(ads) > 1 else ads, 1.8, "fcc")
        slab.set_tags([0] * (len(slab) - len(ads)) + [2] * len(ads))
        slab.set_constraint(FixAtoms(indices=range(32)))
        slab.positions += rng.normal(0, 0.03, slab.positions.shape)
        slab.info.pop("adsorbate_info", None)
        slab.calc = SinglePointCalculator(slab, energy=float(rng.normal()), forces=rng.normal(0, 0.3, (len(slab), 3)))
        slabs.append(slab)
    return slabs


def timings(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def summary(times: list[float], structures: int) -> dict:
    best, median = min(times), statistics.median(times)
    return {
        "seconds_min": best,
        "seconds_median": median,
        "structures": structures,
        "structures_per_s_best": structures / best,
        "structures_per_s_median": structures / median,
        "times_s": times,
    }


def bench_graph_slabs(slabs: list, repeats: int) -> dict:
    from spherical_channels.data import AtomicBatch, build_graph

    batches = [AtomicBatch.from_atoms(slabs[i : i + BATCH_SIZE]) for i in range(0, len(slabs), BATCH_SIZE)]
    build_graph(batches[0], cutoff=CUTOFF, max_num_neighbors=MAX_NEIGHBORS)  # warm-up
    edges = sum(build_graph(b, cutoff=CUTOFF, max_num_neighbors=MAX_NEIGHBORS).num_edges for b in batches)
    out = summary(timings(lambda: [build_graph(b, cutoff=CUTOFF, max_num_neighbors=MAX_NEIGHBORS) for b in batches], repeats), len(slabs))
    out["atoms_per_structure"] = sum(len(s) for s in slabs) / len(slabs)
    out["edges_per_structure"] = edges / len(slabs)
    return out


def _bulk_child(repeats: int, threads: int, queue) -> None:
    """Runs in a spawned process: time the 10k-atom graph, report peak RSS."""
    import torch
    from ase.build import bulk

    from spherical_channels.data import AtomicBatch, build_graph

    torch.set_num_threads(threads)
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(BULK_REPEAT)
    batch = AtomicBatch.from_atoms([atoms])
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        graph = build_graph(batch, cutoff=CUTOFF, max_num_neighbors=MAX_NEIGHBORS)
        times.append(time.perf_counter() - t)
    queue.put({
        "natoms": len(atoms),
        "edges": graph.num_edges,
        "seconds_min": min(times),
        "seconds_median": statistics.median(times),
        "times_s": times,
        "rss_before_mb": rss_before,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    })


def bench_graph_bulk(repeats: int, threads: int) -> dict:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_bulk_child, args=(repeats, threads, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def bench_read(path: Path, repeats: int) -> dict:
    from spherical_channels.data import open_dataset

    out = {}
    t = time.perf_counter()
    ds = open_dataset(path)
    out["open_s"] = time.perf_counter() - t
    for validate in (True, False):
        ds.validate = validate
        ds[0]
        out["validated" if validate else "unvalidated"] = summary(
            timings(lambda: [ds[i] for i in range(len(ds))], repeats), len(ds)
        )
    return out


def bench_loader(path: Path, workers: int, repeats: int) -> dict:
    from torch.utils.data import DataLoader

    from spherical_channels.data import AtomicBatch, open_dataset

    ds = open_dataset(path)
    loader = DataLoader(
        ds, batch_size=BATCH_SIZE, num_workers=workers, collate_fn=AtomicBatch.from_atoms,
        persistent_workers=workers > 0,
    )
    sum(1 for _ in loader)  # warm-up (starts the workers)
    result = summary(timings(lambda: sum(1 for _ in loader), repeats), len(ds))
    del loader
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--structures", type=int, default=256, help="slabs in the datasets (default 256)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--no-aselmdb", dest="aselmdb", action="store_false", help="skip the aselmdb runs")
    parser.add_argument("--quick", action="store_true", help="64 structures, 3 repeats")
    args = parser.parse_args()
    if args.quick:
        args.structures, args.repeats = 64, 3

    import torch

    from spherical_channels.data import write_dataset

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(args.threads)
    results: dict = {
        "config": {**vars(args), "cutoff": CUTOFF, "max_num_neighbors": MAX_NEIGHBORS, "batch_size": BATCH_SIZE},
        "loadavg_before": os.getloadavg()[0],
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "cpu_count": os.cpu_count(),
    }
    results["graph_bulk"] = bench_graph_bulk(max(2, args.repeats // 2), args.threads)
    slabs = make_slabs(args.structures)
    results["graph_slabs"] = bench_graph_slabs(slabs, args.repeats)
    formats = ["extxyz"] + (["aselmdb"] if args.aselmdb else [])
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in formats:
            path = Path(tmp) / f"slabs.{fmt}"
            write_dataset(slabs, path)
            results[f"file_mb_{fmt}"] = path.stat().st_size / 2**20
            results[f"read_{fmt}"] = bench_read(path, args.repeats)
            for workers in (0, 2):
                results[f"loader_{fmt}_w{workers}"] = bench_loader(path, workers, args.repeats)
    results["loadavg_after"] = os.getloadavg()[0]
    results["peak_rss_mb_main"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    b = results["graph_bulk"]
    s = results["graph_slabs"]
    print(f"{'what':<44} {'best':>12} {'median':>12}")
    print(f"{'graph, ~%d-atom slabs (structures/s)' % round(s['atoms_per_structure']):<44} "
          f"{s['structures_per_s_best']:>12.1f} {s['structures_per_s_median']:>12.1f}")
    print(f"{'graph, %d-atom bulk (s)' % b['natoms']:<44} {b['seconds_min']:>12.3f} {b['seconds_median']:>12.3f}"
          f"   peak RSS {b['peak_rss_mb']:.0f} MB (before {b['rss_before_mb']:.0f} MB)")
    for fmt in formats:
        for key in ("validated", "unvalidated"):
            r = results[f"read_{fmt}"][key]
            print(f"{f'ds[i], {fmt}, {key} (structures/s)':<44} {r['structures_per_s_best']:>12.1f} {r['structures_per_s_median']:>12.1f}")
        for workers in (0, 2):
            r = results[f"loader_{fmt}_w{workers}"]
            print(f"{f'DataLoader, {fmt}, {workers} workers (structures/s)':<44} {r['structures_per_s_best']:>12.1f} {r['structures_per_s_median']:>12.1f}")
    print(json.dumps(results))


if __name__ == "__main__":
    sys.exit(main())

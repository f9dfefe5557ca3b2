#!/usr/bin/env python
"""Time OUR SCN (``spherical_channels.models.SCN``) on CPU, mirroring the ``bench``
subcommand of the official-SCN harness (``fairchem_scn.py bench``) so that the numbers
can be put side by side.

Example::

    python benchmarks/bench_model.py --config cfg_bench.json \
        --structures tests/fixtures/structures_small.extxyz \
        --batch-size 4 --steps 10 --warmup 2 --threads 2

What is timed (each per step, ``time.perf_counter``), in this order:

* ``graph_only``: ``spherical_channels.data.neighbors.build_graph(batch, cutoff,
  max_num_neighbors)`` alone (1 warm-up call, as the harness does).
* ``forward``: ``model.eval()``, ``model(batch)`` under ``torch.no_grad()``; the graph is
  built inside the forward (as in the official code with ``otf_graph=True``).
* ``train_step``: ``model.train()``, AdamW(lr 4e-4, amsgrad=True); zero_grad, forward,
  loss = 2*mean|E-E_t| + 100*mean_atoms ||F-F_t||_2, backward, clip_grad_norm_(100), step.

With ``--amp bf16`` the model call (not the loss, clipping or optimiser) runs under
``torch.autocast("cpu", dtype=torch.bfloat16)``, as the trainer's ``optim.amp: bf16`` does;
the geometry and frames stay in float32 inside the model either way.

Batches are built exactly like the harness: ``nb = ceil(n / B)`` full batches that wrap
around the structure list (``chunk = [atoms[(k*B+t) % n] for t in range(B)]``); step ``s``
uses batch ``s % nb``; random targets from ``torch.Generator().manual_seed(1234)``
(energy ``[B]`` then forces ``[N, 3]`` per batch). Reading the extxyz and building the
``AtomicBatch`` objects happens before any timing.

The last line printed is one JSON object; ``summarize`` has the harness's definitions:
per batch the min and median over the steps that used it, ``structures_per_s_best`` =
B * nb / sum(per-batch minima), ``structures_per_s_median`` = B * nb / sum(per-batch
medians). Peak RSS is ``ru_maxrss`` (the process high-water mark) before timing, after
the forward timing and after the training timing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import sys
import time

# Keys of an official config that our SCN constructor does not take.
_IGNORED_KEYS = ("name",)


def load_config(path: str) -> dict:
    """SCN constructor arguments from a JSON file (the peers' cfg_bench.json) or from the
    model: section of a training YAML (configs/...)."""
    if path.endswith((".yaml", ".yml")):
        from spherical_channels.training import load_config as load_training_config

        return dict(load_training_config(path).model)
    with open(path) as fh:
        cfg = json.load(fh)
    # like the harness: allow "_comment"-style keys
    return {k: v for k, v in cfg.items() if not k.startswith("_") and k not in _IGNORED_KEYS}


def summarize(ts, atoms_per_batch, nb, B):
    """Same definitions as ``summarize`` in the official harness's ``cmd_bench``."""
    mean = statistics.fmean(ts)
    tot_atoms = sum(atoms_per_batch[s % nb] for s in range(len(ts)))
    per_batch = []
    for k in range(nb):
        tk = ts[k::nb]
        if tk:
            per_batch.append(
                {"atoms": atoms_per_batch[k], "min_s": min(tk), "median_s": statistics.median(tk)}
            )
    best = sum(p["min_s"] for p in per_batch)
    med = sum(p["median_s"] for p in per_batch)
    return {
        "steps": len(ts),
        "mean_s": mean,
        "median_s": statistics.median(ts),
        "min_s": min(ts),
        "max_s": max(ts),
        "structures_per_s": B * len(ts) / sum(ts),
        "atoms_per_s": tot_atoms / sum(ts),
        "structures_per_s_median": B * len(per_batch) / med,
        "structures_per_s_best": B * len(per_batch) / best,
        "atoms_per_s_best": sum(p["atoms"] for p in per_batch) / best,
        "sum_per_batch_min_s": best,
        "sum_per_batch_median_s": med,
        "per_batch": per_batch,
        "step_times_s": [round(t, 5) for t in ts],
    }


def rss_mb() -> float:
    # Linux: ru_maxrss in KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def versions() -> dict:
    import numpy
    import torch

    out = {"torch": torch.__version__, "numpy": numpy.__version__, "python": sys.version.split()[0]}
    for mod in ("vesin", "ase", "e3nn"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover
            out[mod] = "unknown"
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Benchmark spherical_channels SCN (CPU), harness-compatible")
    ap.add_argument("--config", required=True, help="JSON of SCN constructor kwargs (official names), or a training YAML")
    ap.add_argument("--structures", required=True, help="extxyz file")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-/inter-op threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--roll", choices=["random", "fixed"], default="random",
                    help="edge-frame roll rule in training mode (eval mode always uses 'fixed')")
    ap.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none",
                    help="run the model under bf16 (or, on CUDA, fp16) autocast, as the trainer's optim.amp")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:k] (times are taken after a synchronize)")
    ap.add_argument("--skip", choices=["none", "forward", "train"], default="none",
                    help="skip one of the timed phases (default: time everything)")
    ap.add_argument("--force-modes", action="store_true",
                    help="also time the training step of the config's direct-force and energy-conserving "
                         "(direct_forces false) variants side by side, alternating step by step on the same "
                         "batches, and report conservative / direct")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(args.threads)
    except RuntimeError:
        pass
    torch.manual_seed(args.seed)
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]

    from ase.io import read

    from spherical_channels.data.batch import AtomicBatch
    from spherical_channels.data.neighbors import build_graph
    from spherical_channels.models import SCN

    cfg = load_config(args.config)
    device = torch.device(args.device)
    if args.amp == "fp16" and device.type != "cuda":
        raise SystemExit("--amp fp16 needs --device cuda (use bf16 on a CPU)")
    model = SCN(**cfg, roll=args.roll, eval_roll="fixed").to(device=device, dtype=dtype)
    import contextlib

    def autocast():
        if args.amp != "none":
            return torch.autocast(device.type, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16)
        return contextlib.nullcontext()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    nparam = sum(p.numel() for p in model.parameters())

    # ---------------------------------------------------------------- data (untimed)
    atoms_all = read(args.structures, ":")
    n, B = len(atoms_all), args.batch_size
    nb = max(1, math.ceil(n / B))
    gen = torch.Generator().manual_seed(1234)
    batches = []
    for k in range(nb):  # full batches, wrapping around the structure list
        chunk = [atoms_all[(k * B + t) % n] for t in range(B)]
        batch = AtomicBatch.from_atoms(chunk, dtype=dtype, device=device)
        e_t = torch.randn(B, generator=gen).to(device=device, dtype=dtype)
        f_t = torch.randn(batch.num_atoms, 3, generator=gen).to(device=device, dtype=dtype)
        batches.append((batch, e_t, f_t))
    atoms_per_batch = [b[0].num_atoms for b in batches]

    def timed(fn, steps, warmup):
        for s in range(warmup):
            fn(batches[s % nb])
        ts = []
        for s in range(steps):
            sync()
            t = time.perf_counter()
            fn(batches[s % nb])
            sync()
            ts.append(time.perf_counter() - t)
        return ts

    def summ(ts):
        return summarize(ts, atoms_per_batch, nb, B)

    rss0 = rss_mb()
    load_before = os.getloadavg()
    t_start = time.time()

    # ---------------------------------------------------------------- graph only
    edges_per_batch = []

    def graph_only(b):
        with torch.no_grad():
            return model.build_graph(b[0])  # the model's own rule (the smooth variant: no cap)

    for b in batches:
        edges_per_batch.append(graph_only(b).num_edges)
    g_ts = timed(graph_only, args.steps, 1)

    # ---------------------------------------------------------------- forward
    f_ts = None
    rss_fwd = None
    if args.skip != "forward":
        model.eval()

        def fwd(b):
            with torch.no_grad(), autocast():
                return model(b[0])

        f_ts = timed(fwd, args.steps, args.warmup)
        rss_fwd = rss_mb()

    # ---------------------------------------------------------------- training step
    t_ts = None
    rss_train = None
    last_loss = None
    if args.skip != "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=4e-4, amsgrad=True)

        def train_step(b):
            nonlocal last_loss
            batch, e_t, f_t = b
            opt.zero_grad(set_to_none=True)
            with autocast():
                out = model(batch)
            loss = _loss(out, e_t, f_t)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 100.0)
            opt.step()
            last_loss = float(loss.detach())
            return last_loss

        t_ts = timed(train_step, args.steps, args.warmup)
        rss_train = rss_mb()

    # ---------------------------------------------------------------- direct vs conservative
    force_modes = None
    if args.force_modes:
        force_modes = _force_modes(cfg, args, batches, summ, dtype)

    t_end = time.time()
    g = summ(g_ts)
    res = {
        "implementation": "spherical_channels",
        "config": os.path.basename(args.config),
        "model_attributes": cfg,
        "dtype": args.dtype,
        "amp": args.amp,
        "device": str(device),
        "cuda_peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "roll": {"train": args.roll, "eval": "fixed"},
        "num_params": nparam,
        "batch_size": B,
        "n_batches": nb,
        "atoms_per_batch": atoms_per_batch,
        "edges_per_batch": edges_per_batch,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "graph_only": g,
        "forward": summ(f_ts) if f_ts else None,
        "train_step": summ(t_ts) if t_ts else None,
        "peak_rss_mb": {"before_timing": rss0, "after_forward": rss_fwd, "after_train": rss_train},
        "loadavg_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_end)),
        "host": {"machine": platform.machine(), "cpu_count": os.cpu_count()},
        "versions": versions(),
    }
    # Share of a step spent building the graph (graph built once per forward).
    share = {}
    for key in ("forward", "train_step"):
        r = res[key]
        if r:
            share[key] = {
                "by_min": g["sum_per_batch_min_s"] / r["sum_per_batch_min_s"],
                "by_median": g["sum_per_batch_median_s"] / r["sum_per_batch_median_s"],
            }
    res["graph_share"] = share
    if force_modes is not None:
        res["force_modes"] = force_modes
    if last_loss is not None:
        res["last_train_loss"] = last_loss

    for key in ("graph_only", "forward", "train_step"):
        r = res[key]
        if not r:
            continue
        print(f"{key:11s}: mean {r['mean_s']*1e3:8.1f} ms/step  median {r['median_s']*1e3:8.1f} ms  "
              f"{r['structures_per_s']:7.2f} structures/s (mean)  {r['structures_per_s_median']:7.2f} (median)  "
              f"{r['structures_per_s_best']:7.2f} (best)  {r['atoms_per_s']:8.1f} atoms/s (mean)")
    if "train_step" in share:
        print(f"graph share of train step: {100*share['train_step']['by_min']:.1f}% (by min), "
              f"{100*share['train_step']['by_median']:.1f}% (by median)")
    peak = rss_train if rss_train is not None else (rss_fwd if rss_fwd is not None else rss0)
    print(f"peak RSS: {peak:.0f} MB (before timing {rss0:.0f} MB, after forward "
          f"{rss_fwd if rss_fwd is None else round(rss_fwd)} MB); params {nparam}; threads {res['threads']}; "
          f"loadavg(1min) {load_before[0]:.2f} -> {res['loadavg_1min']['after']:.2f}")
    if force_modes is not None:
        r = force_modes["conservative_over_direct"]
        print(f"training step, energy-conserving / direct forces: {r['by_min']:.2f}x (by min), "
              f"{r['by_median']:.2f}x (by median)")
    print(json.dumps(res))
    return 0


def _loss(out, e_t, f_t):
    import torch

    return 2.0 * torch.mean(torch.abs(out["energy"] - e_t)) + 100.0 * torch.mean(
        torch.linalg.vector_norm(out["forces"] - f_t, dim=-1)
    )


def _force_modes(cfg, args, batches, summ, dtype) -> dict:
    """Training steps of the direct-force and the energy-conserving variant of ``cfg``, one
    after the other on each batch (so that load changes hit both alike)."""
    import torch

    from spherical_channels.models import SCN

    variants = {}
    for name, direct in (("direct", True), ("conservative", False)):
        torch.manual_seed(args.seed)
        model = SCN(**{**cfg, "direct_forces": direct}, roll=args.roll, eval_roll="fixed").to(
            device=batches[0][0].positions.device, dtype=dtype).train()
        variants[name] = (model, torch.optim.AdamW(model.parameters(), lr=4e-4, amsgrad=True))

    def step(name, b):
        model, opt = variants[name]
        batch, e_t, f_t = b
        opt.zero_grad(set_to_none=True)
        _loss(model(batch), e_t, f_t).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 100.0)
        opt.step()

    nb = len(batches)
    times = {name: [] for name in variants}
    for s in range(args.warmup + args.steps):
        for name in variants:
            t = time.perf_counter()
            step(name, batches[s % nb])
            if s >= args.warmup:
                times[name].append(time.perf_counter() - t)
    out = {name: summ(ts) for name, ts in times.items()}
    out["conservative_over_direct"] = {
        "by_min": out["conservative"]["sum_per_batch_min_s"] / out["direct"]["sum_per_batch_min_s"],
        "by_median": out["conservative"]["sum_per_batch_median_s"] / out["direct"]["sum_per_batch_median_s"],
    }
    return out


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Side-by-side CPU benchmark: the official SCN (fairchem-core, via its harness
``fairchem_scn.py bench``) against ours (``benchmarks/bench_model.py``).

Example::

    python benchmarks/compare_official.py \
        --official-harness /work/shared/peers/fairchem_scn.py \
        --official-python ~/.venvs/fairchem-scn/bin/python \
        --config /work/shared/peers/cfg_bench.json \
        --structures tests/fixtures/structures_small.extxyz \
        --batch-size 4 --steps 10 --threads 2 --rounds 2

Each run is its own subprocess (so peak RSS is per implementation), run one after the
other, alternating: official, ours, official, ours, ... for ``--rounds`` rounds, so slow
drifts of the machine's load hit both sides alike.

``--amp none,bf16`` measures float32 and CPU bf16 autocast in the same run (each round runs
every mode): our side with ``bench_model.py --amp bf16``, the official side through
``official_amp.py``, which autocasts the official model's calls the way fairchem's trainer
does (forward under autocast; loss and optimiser outside).

Aggregation per side and phase (forward, train_step, graph_only):
* ``min``: the best round, i.e. the smallest sum of per-batch minima over the rounds;
* ``median``: the median over rounds of the sum of per-batch medians.
Ratios are ``official / ours`` of those time sums, i.e. our throughput relative to the
official one (> 1: ours is faster). Peak RSS: the largest ``ru_maxrss`` after training
over the rounds for each side; its ratio is ``official / ours`` too (> 1: ours uses less).

The last line printed is the JSON summary; a human-readable table is printed before it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PHASES = ("graph_only", "forward", "train_step")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def last_json_line(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            return json.loads(line)
    raise ValueError("no JSON line in the output")


def sums(res: dict, phase: str) -> tuple[float, float]:
    """(sum of per-batch minima, sum of per-batch medians) in seconds."""
    pb = res[phase]["per_batch"]
    return sum(p["min_s"] for p in pb), sum(p["median_s"] for p in pb)


def run_one(label: str, cmd: list[str], timeout: float, log_dir: str | None, tag: str) -> dict:
    print(f"[{now()}] {label}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.time()
    load0 = os.getloadavg()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.time() - t0
    if log_dir:
        with open(os.path.join(log_dir, f"{tag}.stdout"), "w") as fh:
            fh.write(proc.stdout)
        with open(os.path.join(log_dir, f"{tag}.stderr"), "w") as fh:
            fh.write(proc.stderr)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-3000:]
        raise SystemExit(f"{label} failed (exit {proc.returncode}):\n{tail}")
    res = last_json_line(proc.stdout)
    res["_run"] = {
        "label": label,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t0)),
        "wall_s": wall,
        "loadavg_at_start": list(load0),
        "loadavg_at_end": list(os.getloadavg()),
    }
    tr = res.get("train_step") or {}
    fw = res.get("forward") or {}
    print(f"[{now()}] {label}: done in {wall:.0f}s; forward {fw.get('structures_per_s_best', float('nan')):.2f} "
          f"struct/s (best), train {tr.get('structures_per_s_best', float('nan')):.2f} struct/s (best); "
          f"loadavg {load0[0]:.2f} -> {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
    return res


def aggregate(runs: list[dict]) -> dict:
    out = {}
    for phase in PHASES:
        mins, meds = zip(*(sums(r, phase) for r in runs))
        out[phase] = {
            "best_sum_per_batch_min_s": min(mins),
            "median_sum_per_batch_median_s": statistics.median(meds),
            "per_round_sum_min_s": list(mins),
            "per_round_sum_median_s": list(meds),
        }
    rss = [r["peak_rss_mb"]["after_train"] for r in runs]
    out["peak_rss_mb"] = {"max": max(rss), "per_round": rss,
                          "before_timing_per_round": [r["peak_rss_mb"]["before_timing"] for r in runs],
                          "after_forward_per_round": [r["peak_rss_mb"]["after_forward"] for r in runs]}
    out["loadavg_1min_per_round"] = [r.get("loadavg_1min") for r in runs]
    out["started_per_round"] = [r["_run"]["started"] for r in runs]
    out["num_params"] = runs[0].get("num_params")
    out["atoms_per_batch"] = runs[0].get("atoms_per_batch")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Benchmark official SCN vs ours, alternating subprocesses")
    ap.add_argument("--official-harness", required=True, help="path to fairchem_scn.py")
    ap.add_argument("--official-python", required=True, help="python of the fairchem venv")
    ap.add_argument("--ours-python", default=sys.executable, help="python with spherical_channels installed")
    ap.add_argument("--config", required=True)
    ap.add_argument("--structures", required=True)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                    help="our dtype (the official bench runs float32)")
    ap.add_argument("--roll", choices=["random", "fixed"], default="random",
                    help="our training roll (the official bench uses random)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="per subprocess, seconds")
    ap.add_argument("--amp", default="none",
                    help="comma-separated autocast modes to measure, each against the other side's same mode: "
                         "none (float32) and/or bf16 (CPU bf16 autocast on both sides)")
    ap.add_argument("--log-dir", default=None, help="keep each run's stdout/stderr here")
    ap.add_argument("--out", default=None, help="also write the JSON summary (with raw runs) here")
    args = ap.parse_args(argv)

    harness = os.path.expanduser(args.official_harness)
    off_py = os.path.expanduser(args.official_python)
    if not os.path.isfile(harness):
        print(f"error: official harness not found: {harness!r} (pass --official-harness "
              f"PATH/fairchem_scn.py; it is not part of this package)", file=sys.stderr)
        return 2
    if not (os.path.isfile(off_py) or shutil.which(off_py)):
        print(f"error: official python not found: {off_py!r} (pass --official-python, the "
              f"interpreter of the venv with fairchem-core installed)", file=sys.stderr)
        return 2
    for p in (args.config, args.structures):
        if not os.path.isfile(p):
            print(f"error: file not found: {p!r}", file=sys.stderr)
            return 2
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
    modes = [m.strip() for m in args.amp.split(",") if m.strip()]
    if not modes or any(m not in ("none", "bf16") for m in modes):
        print(f"error: --amp takes none and/or bf16, got {args.amp!r}", file=sys.stderr)
        return 2
    if "bf16" in modes and args.dtype != "float32":
        print("error: --amp bf16 compares against the official float32 model: use --dtype float32", file=sys.stderr)
        return 2

    common = ["--config", args.config, "--structures", args.structures,
              "--batch-size", str(args.batch_size), "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--threads", str(args.threads), "--seed", str(args.seed)]

    def commands(amp: str) -> tuple[list[str], list[str]]:
        off = [off_py, harness, "bench", *common]
        if amp == "bf16":
            off = [off_py, os.path.join(HERE, "official_amp.py"), harness, "bench", *common]
        ours = [args.ours_python, os.path.join(HERE, "bench_model.py"), *common,
                "--dtype", args.dtype, "--roll", args.roll, "--amp", amp]
        return off, ours

    started = now()
    runs = {amp: ([], []) for amp in modes}
    for r in range(args.rounds):
        for amp in modes:
            off_cmd, our_cmd = commands(amp)
            runs[amp][0].append(run_one(f"official amp={amp} round {r + 1}/{args.rounds}", off_cmd, args.timeout,
                                        args.log_dir, f"official_{amp}_{r + 1}"))
            runs[amp][1].append(run_one(f"ours amp={amp} round {r + 1}/{args.rounds}", our_cmd, args.timeout,
                                        args.log_dir, f"ours_{amp}_{r + 1}"))
    finished = now()
    summaries = {amp: summarize_mode(args, amp, *runs[amp], started, finished) for amp in modes}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"modes": summaries, "raw": {amp: {"official": o, "ours": u} for amp, (o, u) in runs.items()}},
                      fh, indent=1)
    if "none" in summaries and "bf16" in summaries:
        for side in ("official", "ours"):
            print(f"{side}: bf16 autocast over float32 throughput: " + ", ".join(
                f"{phase} {summaries['none'][side][phase]['best_sum_per_batch_min_s'] / summaries['bf16'][side][phase]['best_sum_per_batch_min_s']:.2f}x"
                for phase in ("forward", "train_step")))
    print(json.dumps({"modes": summaries} if len(modes) > 1 else summaries[modes[0]]))
    return 0


def summarize_mode(args, amp: str, official: list[dict], ours: list[dict], started: str, finished: str) -> dict:
    """Aggregates, ratios and the printed table of one autocast mode."""
    agg_off, agg_ours = aggregate(official), aggregate(ours)
    ratios = {}
    for phase in PHASES:
        o, u = agg_off[phase], agg_ours[phase]
        ratios[phase] = {
            "min": o["best_sum_per_batch_min_s"] / u["best_sum_per_batch_min_s"],
            "median": o["median_sum_per_batch_median_s"] / u["median_sum_per_batch_median_s"],
        }
    ratios["peak_rss"] = agg_off["peak_rss_mb"]["max"] / agg_ours["peak_rss_mb"]["max"]

    nb = len(agg_off["atoms_per_batch"] or [1])
    B = args.batch_size

    def sps(t):  # structures/s from a sum over one pass through the batches
        return B * nb / t

    summary = {
        "started": started,
        "finished": finished,
        "settings": {"config": os.path.abspath(args.config), "structures": os.path.abspath(args.structures),
                     "batch_size": B, "steps": args.steps, "warmup": args.warmup, "threads": args.threads,
                     "rounds": args.rounds, "our_dtype": args.dtype, "amp": amp, "our_train_roll": args.roll,
                     "official_roll": "random (train and eval)", "our_eval_roll": "fixed"},
        "ratio_official_over_ours": ratios,
        "ratio_meaning": "time(official)/time(ours) = throughput(ours)/throughput(official); "
                         ">1 means ours is faster (peak_rss: >1 means ours uses less memory)",
        "structures_per_s": {
            side: {phase: {"best": sps(a[phase]["best_sum_per_batch_min_s"]),
                           "median": sps(a[phase]["median_sum_per_batch_median_s"])} for phase in PHASES}
            for side, a in (("official", agg_off), ("ours", agg_ours))
        },
        "peak_rss_mb": {"official": agg_off["peak_rss_mb"]["max"], "ours": agg_ours["peak_rss_mb"]["max"]},
        "official": agg_off,
        "ours": agg_ours,
        "graph_share_of_train_step_ours": [r.get("graph_share", {}).get("train_step") for r in ours],
        "versions": {"official": official[0].get("versions"), "ours": ours[0].get("versions")},
    }

    # ---------------------------------------------------------------- table
    print(f"\nSCN CPU benchmark  amp={amp}  B={B} steps={args.steps} threads={args.threads} rounds={args.rounds} "
          f"({summary['started']} .. {summary['finished']})")
    print(f"params: official {agg_off['num_params']}, ours {agg_ours['num_params']}; "
          f"atoms per batch {agg_off['atoms_per_batch']}")
    hdr = f"{'phase':11s} {'stat':6s} {'official s':>11s} {'ours s':>9s} {'off/ours':>9s} " \
          f"{'official st/s':>14s} {'ours st/s':>10s}"
    print(hdr)
    print("-" * len(hdr))
    for phase in PHASES:
        for stat, key in (("min", "best_sum_per_batch_min_s"), ("median", "median_sum_per_batch_median_s")):
            o, u = agg_off[phase][key], agg_ours[phase][key]
            print(f"{phase:11s} {stat:6s} {o:11.4f} {u:9.4f} {o / u:9.2f} {sps(o):14.2f} {sps(u):10.2f}")
    print(f"{'peak RSS':11s} {'MB':6s} {agg_off['peak_rss_mb']['max']:11.0f} {agg_ours['peak_rss_mb']['max']:9.0f} "
          f"{ratios['peak_rss']:9.2f}")
    print("(time sums over one pass through the batches; off/ours > 1: ours faster / smaller)")
    loads = [r.get("loadavg_1min") for r in official + ours]
    print("loadavg(1min) before/after each run: "
          + ", ".join(f"{l['before']:.1f}/{l['after']:.1f}" for l in loads if l))
    return summary


if __name__ == "__main__":
    sys.exit(main())

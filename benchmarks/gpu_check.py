#!/usr/bin/env python
"""Everything this package checks on a GPU, in one go (about 10 minutes on one H200).

    python benchmarks/gpu_check.py --out OUT_DIR [--data DIR] [--minutes 9]

Run from the repository root on a machine with CUDA. In order, each step with its own time
limit, each writing its output to ``OUT_DIR`` (``<step>.log``, JSON lines in ``<step>.jsonl``)
and a one-line verdict to ``summary.json``:

1. ``tests``: the CUDA tests (``tests/cuda``: official fixtures on the device, batched
   relaxation with memory-sized batches, batched MD, the calculator and a training step under
   each autocast mode, all against the CPU) and the official-fixture tests.
2. ``model``: ``bench_model.py`` on the device with the benchmark configuration
   (``benchmarks/cfg_bench.json``, the peers' ``cfg_bench.json``): forward and training step in
   float32, bf16 and fp16 autocast, batch sizes 4 and 32.
3. ``relax``: ``bench_relax.py --device cuda``: the batched engine against the per-structure
   ASE loop on 200 IS2RS structures of the built-in data (``--data``, a folder written by
   ``scn data generate DIR --size small``; made here if not given, which takes a few
   minutes), a random-weight ``configs/small/scn_small_conservative.yaml`` model.

The side-by-side with the official code (``compare_official.py``) is not among the steps: the
peers' harness times the official model on the CPU only, and fairchem-core is not installed on
a bare GPU machine.

Preparing a bare GPU machine: it needs this package's dependencies that its image lacks
(ase, vesin, ase-db-backends, lmdb; torch, e3nn, numpy, tqdm, PyYAML, matplotlib and
tensorboard are usually there). Download their wheels here for its Python, e.g. ``pip download
--no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl ase
vesin ase-db-backends lmdb``, carry ``.whl`` and run ``pip install --no-index --no-deps
--target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site:src`` before this script.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _run(name: str, cmd: list[str], out: Path, timeout: float, summary: dict) -> str:
    """Run one step; its stdout and stderr go to ``out/<name>.log``; JSON lines to ``.jsonl``."""
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd)}", flush=True)
    began = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        text, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        text = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        code = "timeout"
    seconds = time.perf_counter() - began
    (out / f"{name}.log").open("a").write(f"$ {' '.join(cmd)}\n{text}\n")
    lines = [line for line in text.splitlines() if line.startswith("{") and line.endswith("}")]
    if lines:
        with (out / f"{name}.jsonl").open("a") as fh:
            fh.writelines(line + "\n" for line in lines)
    summary.setdefault(name, []).append({"command": cmd[1:], "exit": code, "seconds": round(seconds, 1)})
    print(f"[{time.strftime('%H:%M:%S')}] {name}: exit {code} in {seconds:.0f} s", flush=True)
    tail = "\n".join(text.strip().splitlines()[-6:])
    if tail:
        print(tail, flush=True)
    return text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data", type=Path, help="a folder written by scn data generate DIR --size small")
    p.add_argument("--minutes", type=float, default=9.0, help="the whole script's budget")
    p.add_argument("--steps", type=str, default="tests,model,relax")
    p.add_argument("--device", default="cuda", help="cpu: a dry run of the same steps on the CPU (slow)")
    args = p.parse_args()

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + 60 * args.minutes
    summary: dict = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
                     "torch": torch.__version__}
    os.environ["SCN_TEST_ACCELERATOR"] = args.device
    py = sys.executable

    def left(cap: float) -> float:
        return max(10.0, min(cap, deadline - time.monotonic()))

    steps = args.steps.split(",")
    if "tests" in steps:
        _run("tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/cuda",
                       "tests/models/test_fairchem_fixtures.py"], args.out, left(150), summary)
    if "model" in steps:
        for batch_size in (4, 32):
            for amp in ("none", "bf16", "fp16") if args.device == "cuda" else ("none",):
                _run("model", [py, str(HERE / "bench_model.py"), "--config", str(HERE / "cfg_bench.json"),
                               "--structures", "tests/fixtures/structures_small.extxyz", "--batch-size",
                               str(batch_size), "--steps", "10", "--warmup", "3", "--device", args.device,
                               "--amp", amp, "--threads", "4"], args.out, left(60), summary)
    if "relax" in steps:
        data = args.data
        if data is None:
            data = args.out / "data"
            _run("relax", [py, "-m", "spherical_channels.cli", "data", "generate", str(data), "--size", "small"],
                 args.out, left(240), summary)
        _run("relax", [py, str(HERE / "bench_relax.py"), "--data", str(data), "--device", args.device,
                       "--structures", "200", "--chunk", "200", "--no-reference"], args.out, left(300), summary)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

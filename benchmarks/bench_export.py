#!/usr/bin/env python
"""Exported and compiled inference against the eager model, on CPU.

Example::

    OMP_NUM_THREADS=1 python benchmarks/bench_export.py             # every model, ~15 minutes on 1 core
    OMP_NUM_THREADS=1 python benchmarks/bench_export.py --models scn_conservative --skip-compile

For each model:

* ``export``: wall time of ``export_model`` per format (``exported-program``, ``aoti``), by stage
  (trace, export, write = AOTInductor compilation, verify), and the file size;
* ``load``: time to load each artefact (``load_exported``);
* ``compile``: ``compile_model`` (torch.compile, inductor backend): trace and first call;
* ``inference``: time per call (``time.perf_counter``, min and median over ``--repeats`` after
  one warm-up) of eager, each artefact and the compiled model, on a batch of the package's
  example structures and on one structure; the neighbour graph (built in Python by every
  variant, the eager model included) is timed alone as ``graph_s``; ``max_abs_diff_energy`` /
  ``max_abs_diff_forces`` against eager.

Models: ``scn_conservative`` (a small SCN with forces -dE/dx: 2 layers, lmax 3, mmax 1,
8 channels, cutoff 5 Å, 20 neighbours, float32), ``scn_official`` (the bundled official-layout
checkpoint: direct forces), ``schnet`` (the SchNet fixture, forces -dE/dx). Every printed line
is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("scn_conservative", "scn_official", "schnet")


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def build(name: str):  # noqa: ANN201 - a model
    import torch

    from spherical_channels.models import SCN
    from spherical_channels.models.checkpoint import load_model
    from spherical_channels.resources import EXAMPLE_CHECKPOINT, resource_path

    if name == "scn_conservative":
        torch.manual_seed(0)
        model = SCN(num_interactions=2, lmax=3, mmax=1, sphere_channels=8, sphere_channels_reduce=8,
                    hidden_channels=16, num_sphere_samples=16, num_basis_functions=8, max_num_neighbors=20,
                    cutoff=5.0, direct_forces=False)
        with torch.no_grad():  # weights scaled as the fixtures': O(1) outputs
            for module in model.modules():
                if isinstance(module, torch.nn.Embedding):
                    module.weight.mul_(300.0)
                elif isinstance(module, torch.nn.Linear):
                    module.weight.mul_(2.0)
        return model.eval()
    if name == "scn_official":
        return load_model(resource_path(EXAMPLE_CHECKPOINT))
    if name == "schnet":
        return load_model(ROOT / "tests" / "fixtures" / "schnet_tiny" / "ckpt.pt")
    raise SystemExit(f"unknown model {name!r}; choose from {MODELS}")


def timed(fn, repeats: int) -> dict:  # noqa: ANN001
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"min_s": min(times), "median_s": statistics.median(times)}


def bench_model(name: str, args: argparse.Namespace, folder: Path) -> None:
    from spherical_channels.data.batch import AtomicBatch
    from spherical_channels.deployment import compile_model, export_model, load_exported
    from spherical_channels.deployment.export import default_examples
    from spherical_channels.deployment.inputs import flat_inputs

    model = build(name)
    examples = default_examples()
    batches = {"batch": AtomicBatch.from_atoms(examples[2:6]), "single": AtomicBatch.from_atoms([examples[6]])}
    variants = {"eager": model}
    for fmt in args.formats:
        path = folder / f"{name}_{fmt}.pt2"
        start = time.perf_counter()
        report = export_model(model, path, format=fmt)
        emit({"model": name, "stage": "export", "format": fmt, "total_s": time.perf_counter() - start,
              **{f"{k}_s": v for k, v in report.seconds.items()}, "bytes": path.stat().st_size,
              "verify_energy_error": report.energy_error, "verify_force_error": report.force_error})
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            variants[fmt] = load_exported(path, trust_pickle=True)
        emit({"model": name, "stage": "load", "format": fmt, "seconds": time.perf_counter() - start})
    if not args.skip_compile:
        start = time.perf_counter()
        compiled = compile_model(model)
        emit({"model": name, "stage": "compile", "total_s": time.perf_counter() - start,
              **{f"{k}_s": v for k, v in compiled.seconds.items()}})
        variants["torch.compile"] = compiled
    for label, batch in batches.items():
        options = next((v.info.graph for k, v in variants.items() if k != "eager"), None)
        graph = timed(lambda: flat_inputs(batch, options), args.repeats) if options is not None else None
        reference = model(batch)
        for variant, runner in variants.items():
            if variant == "torch.compile" and label == "single":
                runner(batch)  # one structure: torch.compile specialises size 1 (a recompilation, untimed)
            out = runner(batch)
            record = {"model": name, "stage": "inference", "variant": variant, "input": label,
                      "structures": batch.num_structures, "atoms": batch.num_atoms,
                      **timed(lambda: runner(batch), args.repeats),
                      "max_abs_diff_energy": float((out["energy"] - reference["energy"]).abs().max()),
                      "max_abs_diff_forces": float((out["forces"] - reference["forces"]).abs().max())}
            if graph is not None:
                record["graph_s"] = graph["min_s"]
            emit(record)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--formats", nargs="+", choices=("exported-program", "aoti"), default=["exported-program", "aoti"])
    parser.add_argument("--skip-compile", action="store_true", help="no torch.compile variant")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    emit({"stage": "environment", "torch": torch.__version__, "python": sys.version.split()[0],
          "machine": platform.machine(), "threads": torch.get_num_threads()})
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            bench_model(name, args, Path(folder))


if __name__ == "__main__":
    main()

"""Side by side: several trained checkpoints (any registered model) on the same data.

    python benchmarks/compare_models.py RUN_DIR [RUN_DIR ...] --data DIR [--structures 64]
        [--batch-size 8] [--threads 1]

Each RUN_DIR is a ``scn train`` output directory (its ``checkpoints/best.pt`` and
``summary.json``). Prints one JSON line per run: model name, parameters, training steps and
steps per second (from the run's summary), and inference throughput (structures per second,
energy and forces, eval mode) on the first ``--structures`` frames of ``DIR/s2ef/test_id.extxyz``
in batches of ``--batch-size``, timed after one warm-up batch. Accuracy and relaxations come
from ``scn eval RUN_DIR/checkpoints/best.pt DIR``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from spherical_channels.data.batch import AtomicBatch
from spherical_channels.data.formats.extxyz import ExtxyzReader
from spherical_channels.models.checkpoint import load_model, read_checkpoint
from spherical_channels.models.registry import spec_of


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--structures", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    reader = ExtxyzReader(args.data / "s2ef" / "test_id.extxyz")
    frames = [reader.read(k) for k in range(min(args.structures, len(reader)))]
    batches = [AtomicBatch.from_atoms(frames[k:k + args.batch_size]) for k in range(0, len(frames), args.batch_size)]
    for run in args.runs:
        checkpoint = read_checkpoint(run / "checkpoints" / "best.pt")
        model = load_model(checkpoint)
        summary = json.loads((run / "summary.json").read_text())
        model(batches[0])  # warm-up
        start = time.perf_counter()
        for batch in batches:
            model(batch)
        seconds = time.perf_counter() - start
        print(json.dumps({
            "run": str(run), "model": spec_of(model).name, "conservative": bool(model.conservative),
            "parameters": sum(t.numel() for t in model.parameters()),
            "train_steps": summary["steps"], "train_seconds": summary["seconds"],
            "train_steps_per_s": summary["steps"] / summary["seconds"],
            "inference_structures_per_s": len(frames) / seconds, "threads": args.threads,
        }), flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Run the official-SCN harness (``fairchem_scn.py``) with its model under CPU bf16 autocast.

    OFFICIAL_PYTHON benchmarks/official_amp.py HARNESS bench --config ... [harness arguments]

fairchem's trainer autocasts the model's forward (``amp: true``) and leaves the loss and the
optimiser outside; on a CPU that mode has to be asked for with ``torch.autocast("cpu",
dtype=torch.bfloat16)``, which this wrapper puts around every call of the model the harness
builds (forward and training step alike). Everything else is the harness unchanged, so its
timings and JSON line are comparable with ``benchmarks/bench_model.py --amp bf16``. The
harness file is loaded from the given path and is not part of this package.

One change is needed for the official SCN to run under autocast at all: it sums the per-atom
energies with ``index_add_`` into a float32 tensor, which refuses the bf16 output of
``energy_fc3`` ("self (Float) and source (BFloat16) must have the same scalar type"). A
forward hook casts the outputs of the last energy and force layers (``energy_fc3``,
``force_fc3``) back to float32, which is what our model does before its sums too.
"""

from __future__ import annotations

import functools
import importlib.util
import sys


def _autocast_forward(model):  # noqa: ANN001, ANN202 - whatever the harness built
    import torch

    forward = model.forward

    @functools.wraps(forward)
    def autocast_forward(*args, **kwargs):  # noqa: ANN202
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return forward(*args, **kwargs)

    model.forward = autocast_forward
    for name in ("energy_fc3", "force_fc3"):
        head = getattr(model, name, None)
        if head is not None:
            head.register_forward_hook(lambda _module, _inputs, output: output.float())
    return model


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("fairchem_scn_harness", argv[0])
    if spec is None or spec.loader is None:
        print(f"error: cannot load the harness {argv[0]!r}", file=sys.stderr)
        return 2
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    build = harness.build_model
    harness.build_model = lambda *a, **k: _autocast_forward(build(*a, **k))
    return int(harness.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

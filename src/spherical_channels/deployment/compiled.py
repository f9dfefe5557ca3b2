"""Inference under ``torch.compile``: the exported program, compiled in memory instead of to a file.

:func:`compile_model` traces the model's program as :func:`~.export.export_model` does (energy
and ``-dE/dx`` as one graph of operations, so nothing of autograd is left at run time) and
hands that graph to ``torch.compile`` with dynamic sizes. The result is an
:class:`~.loaded.ExportedModel` (``format="torch.compile"``), usable wherever a model is.

Compilation happens on the first call (``warm_up`` makes that call on the example structures
and checks the result against the eager model). ``torch.compile`` treats sizes 0 and 1 as
special, so the first call with one structure, one atom or an empty edge group compiles once
more.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from .export import VERIFY_TOLERANCE, traced_program
from .loaded import ExportedModel
from .programs import ExportError

if TYPE_CHECKING:
    import ase

__all__ = ["compile_model"]


def compile_model(
    model: nn.Module,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    example: Sequence["ase.Atoms"] | None = None,
    mode: str | None = None,
    backend: str = "inductor",
    warm_up: bool = True,
) -> ExportedModel:
    """``model`` (an SCN or SchNet) compiled for inference of energies and forces.

    Args:
        model: the model (not modified: a copy is compiled).
        dtype, device: precision and device (default: the model's).
        example: structures to trace with (default: the package's examples).
        mode: ``torch.compile`` mode (``None``, ``"max-autotune"``, ...).
        backend: ``torch.compile`` backend (``"inductor"``: compiled kernels; ``"aot_eager"``
            captures the graph without code generation, for checking).
        warm_up: compile now (first call on the example structures) and compare with the
            eager model (:class:`~.programs.ExportError` beyond the export tolerance).

    Returns:
        an :class:`~.loaded.ExportedModel`; ``.seconds`` holds ``trace`` and ``compile``
        (first call) times.
    """
    start = time.perf_counter()
    traced = traced_program(model, format="torch.compile", dtype=dtype, device=device, example=example)
    seconds = {"trace": time.perf_counter() - start}
    program = torch.compile(traced.graph, dynamic=True, fullgraph=True, mode=mode, backend=backend)
    info = dataclasses.replace(traced.info, format="torch.compile")
    compiled = ExportedModel(program, info).eval()
    if warm_up:
        start = time.perf_counter()
        batch = traced.check_batch
        got = compiled(batch)
        seconds["compile"] = time.perf_counter() - start
        want = traced.model(batch)
        tolerance = VERIFY_TOLERANCE[batch.positions.dtype]
        for key in info.outputs:
            difference = float((got[key] - want[key].detach()).abs().max())
            scale = max(1.0, float(want[key].detach().abs().max()))
            if not difference <= tolerance * scale:
                raise ExportError(f"the compiled program disagrees with the model: max |{key} difference| = {difference:.3g}")
    compiled.seconds = seconds
    return compiled

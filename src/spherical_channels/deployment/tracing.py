"""Tracing a program into one graph of tensor operations with symbolic sizes.

``make_fx(..., tracing_mode="symbolic")`` runs the program on fake tensors whose sizes are
symbols and records every ATen operation, including those autograd runs for
``torch.autograd.grad``: the backward pass becomes part of the graph (NequIP's route to
exporting energy-conserving forces). ``torch.export.export`` then takes that graph with the
atom, structure and edge counts as dynamic dimensions.

Two details keep the sizes symbolic:

* duck shaping is off while tracing, so that a count that happens to equal a weight's size
  (16 atoms, 16 channels) is not merged with it and frozen;
* model code sizes views with ``tensor.shape[0]``, never ``len(tensor)``: an integer taken
  with ``len`` freezes that size to its example value.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .inputs import BASE_INPUTS
from .programs import ExportError

__all__ = ["dynamic_shapes", "trace"]


@contextlib.contextmanager
def _no_duck_shapes() -> Iterator[None]:
    config = torch.fx.experimental._config
    previous = config.use_duck_shape
    config.use_duck_shape = False
    try:
        yield
    finally:
        config.use_duck_shape = previous


def trace(program: nn.Module, inputs: Sequence[torch.Tensor]) -> torch.fx.GraphModule:
    """The program as a graph of ATen operations (forward and, for conservative forces, the
    backward pass) with symbolic sizes, traced at ``inputs``."""
    from torch.fx.experimental.proxy_tensor import make_fx

    with _no_duck_shapes():
        try:
            return make_fx(
                program, tracing_mode="symbolic", _allow_non_fake_inputs=True, _error_on_data_dependent_ops=True
            )(*[t.clone() for t in inputs])
        except Exception as err:  # noqa: BLE001 - report which model could not be traced, and why
            raise ExportError(f"the model could not be traced into a graph: {type(err).__name__}: {_first(err)}") from err


def dynamic_shapes(num_groups: int) -> tuple[dict[int, object], ...]:
    """``torch.export`` dynamic dimensions of the program's inputs (:func:`~.inputs.input_names`):
    atoms N >= 1, structures S >= 1, and each edge group's E_g >= 0."""
    from torch.export import Dim

    atoms, structures = Dim("atoms", min=1), Dim("structures", min=1)
    shapes: list[dict[int, object]] = [{0: atoms}, {0: atoms}, {0: atoms}, {0: structures}]
    assert len(shapes) == len(BASE_INPUTS)
    for g in range(num_groups):
        edges = Dim(f"edges_{g}", min=0)
        shapes += [{1: edges}, {0: edges}]
    return tuple(shapes)


def _first(err: BaseException) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else ""

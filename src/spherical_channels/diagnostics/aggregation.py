"""Equivariance of SCN's message aggregation alone (paper Appendix A.1, eq. 16, Table 5).

Each interaction layer sums its messages ``m`` at every node and combines them with the node's
own coefficients ``x`` by the 1x1 network on the sphere grid,
``F(x, m) = G^-1(F_c(G(x), G(m)))``; without the grid the layer keeps the sum, ``F(x, m) = m``.
The measurement is

    | F(x, m) - D^-1 F(D x, D m) |

per layer, with ``x`` and ``m`` captured from the model on real structures, and ``D`` the
Wigner-D of a random rotation of each structure. It is zero up to rounding for a linear
(or absent) grid network and, for a non-linear one, measures the aliasing of sampling
``F_c``'s output on the finite grid.

Variants (Table 5's rows): the same weights with the grid network's activations swapped
(``linear``: none, ``silu-1`` / ``relu-1``: the first only, ``silu-2`` / ``relu-2``: both, the
model's own layout being ``silu-2``). They measure the block's shape, not retrained models.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..data.batch import AtomicBatch
from ..models.ops import no_autocast
from ..so3.wigner import wigner_D
from .equivariance import AbsDifference, rotate_coefficients

__all__ = [
    "AGGREGATION_VARIANTS",
    "AggregationInputs",
    "aggregate",
    "aggregation_differences",
    "capture_aggregation_inputs",
    "describe_aggregation",
    "swapped_activations",
]

#: Table 5's rows: name -> (activation class or None, number of non-linear layers of F_c).
AGGREGATION_VARIANTS: dict[str, tuple[type[nn.Module] | None, int]] = {
    "linear": (None, 0),
    "silu-1": (nn.SiLU, 1),
    "silu-2": (nn.SiLU, 2),
    "relu-1": (nn.ReLU, 1),
    "relu-2": (nn.ReLU, 2),
}

# F_c is Linear, act, Linear, act, Linear: the activations' positions in grid_mlp.
_ACTIVATION_SLOTS = (1, 3)


@dataclass
class AggregationInputs:
    """What one interaction layer aggregated, as the model computed it.

    Shapes: ``x [N, (L+1)^2, C']`` (the layer's input coefficients after the channel
    reduction), ``messages [N, (L+1)^2, C']`` (summed messages, global frame), ``output
    [N, (L+1)^2, C]`` (the layer's update, kept to check the capture).
    """

    x: torch.Tensor
    messages: torch.Tensor
    output: torch.Tensor


def aggregate(block: nn.Module, x: torch.Tensor, messages: torch.Tensor) -> torch.Tensor:
    """The layer's aggregation ``F(x, m)``: the 1x1 grid network, or the sum itself without
    the grid. ``[N, (L+1)^2, C']`` twice -> ``[N, (L+1)^2, C']``."""
    return block.aggregate(x, messages) if block.use_grid else messages


def describe_aggregation(block: nn.Module) -> str:
    """A few words on a layer's aggregation (for reports)."""
    if not block.use_grid:
        return "sum of messages (no 1x1 grid network): F is the identity"
    names = [type(block.grid_mlp[k]).__name__ for k in _ACTIVATION_SLOTS]
    return f"1x1 network on a {block.grid.resolution[0]}x{block.grid.resolution[1]} grid, activations {names}"


def _check_scn(model: nn.Module) -> None:
    from ..models.scn import SCN

    if not isinstance(model, SCN):
        raise TypeError(f"the aggregation measurement needs an SCN, got {type(model).__name__}")


def capture_aggregation_inputs(model: nn.Module, batch: AtomicBatch) -> list[AggregationInputs]:
    """Run ``model``'s layers on ``batch`` (no gradients; under the caller's autocast, if any)
    and return each layer's aggregation inputs, in layer order.

    Hooks read each layer's input and its message blocks' outputs; the capture is checked by
    recomputing the layer's output from them, so a change of the layer's structure that the
    capture does not follow is an error rather than a wrong measurement.
    """
    _check_scn(model)
    records: list[dict] = [{"messages": []} for _ in model.interactions]

    def keep_input(record: dict, module: nn.Module, args: tuple) -> None:
        record["x"] = args[0]

    def keep_output(record: dict, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        record["output"] = output

    def keep_message(record: dict, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        record["messages"].append(output)

    handles = []
    try:
        for record, block in zip(records, model.interactions):
            handles.append(block.register_forward_pre_hook(lambda m, a, r=record: keep_input(r, m, a)))
            handles.append(block.register_forward_hook(lambda m, a, o, r=record: keep_output(r, m, a, o)))
            for message_block in block.message_blocks:
                handles.append(message_block.register_forward_hook(lambda m, a, o, r=record: keep_message(r, m, a, o)))
        with torch.no_grad():
            with no_autocast(batch.positions):  # the model never autocasts its geometry
                edges = model.edge_data(batch, batch.positions)
            model.embed(batch, edges)
    finally:
        for handle in handles:
            handle.remove()

    captured = []
    with torch.no_grad():
        for layer, (record, block) in enumerate(zip(records, model.interactions)):
            x = block.downsample(record["x"]) if block.resample else record["x"]
            summed = None
            for message in record["messages"]:
                missing = x.shape[1] - message.shape[1]  # a lower-degree resolution
                if missing:
                    message = nn.functional.pad(message, (0, 0, 0, missing))
                summed = message if summed is None else summed + message
            if summed is None:
                raise RuntimeError(f"layer {layer + 1}: no messages were captured")
            item = AggregationInputs(x=x, messages=summed, output=record["output"])
            _check_capture(block, item, layer)
            captured.append(item)
    return captured


def _check_capture(block: nn.Module, item: AggregationInputs, layer: int) -> None:
    """Raise if the captured inputs do not give the layer's output back."""
    out = aggregate(block, item.x, item.messages)
    out = block.upsample(out) if block.resample else out
    expected = item.output.to(torch.float64)
    error = float((out.to(torch.float64) - expected).abs().max()) if expected.numel() else 0.0
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    low_precision = item.output.dtype in (torch.bfloat16, torch.float16)
    if not error <= (2e-2 if low_precision else 1e-4) * (scale + 1e-30):
        raise RuntimeError(
            f"layer {layer + 1}: the captured aggregation inputs do not reproduce the layer's output "
            f"(max error {error:.3g} of {scale:.3g}); InteractionBlock changed and this diagnostic did not follow"
        )


@contextlib.contextmanager
def swapped_activations(block: nn.Module, activation: type[nn.Module] | None, depth: int) -> Iterator[None]:
    """Temporarily give ``block``'s grid network ``depth`` non-linear layers of ``activation``
    (the rest identity); the original modules are put back on exit."""
    if not block.use_grid:
        raise ValueError("this layer has no 1x1 grid network to change")
    if not 0 <= depth <= len(_ACTIVATION_SLOTS):
        raise ValueError(f"depth must be in 0..{len(_ACTIVATION_SLOTS)}, got {depth}")
    mlp = block.grid_mlp
    originals = [mlp[k] for k in _ACTIVATION_SLOTS]
    try:
        for position, k in enumerate(_ACTIVATION_SLOTS):
            mlp[k] = activation() if (activation is not None and position < depth) else nn.Identity()
        yield
    finally:
        for k, module in zip(_ACTIVATION_SLOTS, originals):
            mlp[k] = module


def _layer_differences(
    block: nn.Module, item: AggregationInputs, wigners: Sequence[torch.Tensor], layer: int
) -> AbsDifference:
    """Eq. 16 for one layer: ``F(x, m)`` against ``D^-1 F(D x, D m)`` for every ``D``."""
    acc = AbsDifference()
    with torch.no_grad():
        reference = aggregate(block, item.x, item.messages)
        for wigner in wigners:
            rotated = aggregate(block, rotate_coefficients(wigner, item.x), rotate_coefficients(wigner, item.messages))
            # D is orthogonal: D^-1 = D^T
            back = rotate_coefficients(wigner.transpose(-1, -2), rotated.to(torch.float64))
            acc.add(reference, back, f"aggregation of layer {layer + 1}")
    return acc


def aggregation_differences(
    model: nn.Module,
    batch: AtomicBatch,
    rotations: Sequence[torch.Tensor],
    variants: Sequence[str] = (),
    inputs: list[AggregationInputs] | None = None,
) -> dict[str, list[AbsDifference] | dict[str, list[AbsDifference]]]:
    """Eq. 16 per layer of ``model`` on ``batch``.

    Args:
        model: an SCN.
        rotations: per draw, ``[S, 3, 3]`` float64 (one rotation per structure).
        variants: names from :data:`AGGREGATION_VARIANTS` to measure too, on the same inputs
            (layers without the grid network have none).
        inputs: the captured inputs, if already at hand (:func:`capture_aggregation_inputs`).

    Returns:
        ``{"layers": [AbsDifference per layer], "variants": {name: [AbsDifference per layer]}}``.
    """
    unknown = set(variants) - set(AGGREGATION_VARIANTS)
    if unknown:
        raise ValueError(f"unknown aggregation variants {sorted(unknown)}; known: {list(AGGREGATION_VARIANTS)}")
    if inputs is None:
        inputs = capture_aggregation_inputs(model, batch)
    atoms = batch.batch
    wigners = [wigner_D(r.to(device=atoms.device, dtype=torch.float64)[atoms], model.lmax) for r in rotations]
    blocks = list(model.interactions)
    out: dict = {
        "layers": [_layer_differences(b, item, wigners, k) for k, (b, item) in enumerate(zip(blocks, inputs))],
        "variants": {},
    }
    if all(b.use_grid for b in blocks):
        for name in variants:
            activation, depth = AGGREGATION_VARIANTS[name]
            per_layer = []
            for k, (block, item) in enumerate(zip(blocks, inputs)):
                with swapped_activations(block, activation, depth):
                    per_layer.append(_layer_differences(block, item, wigners, k))
            out["variants"][name] = per_layer
    return out

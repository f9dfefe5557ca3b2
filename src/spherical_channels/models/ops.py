"""Hand-written autograd functions for SCN's hot path.

Each computes what a short chain of PyTorch operations computes, but saves for backward only
what its backward needs (recomputing cheap elementwise values instead of storing them), which
roughly halves the activation memory of a training step. Every backward is written with
differentiable operations, so double backward (training on energy-conserving forces, which
differentiates the forces) works; ``tests/models/test_ops.py`` checks values, gradients and
second derivatives against the plain PyTorch chains with ``gradcheck`` / ``gradgradcheck``.

Shapes: N atoms, E edges, K rows (kept coefficients), B = (L+1)^2 coefficients, C channels.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator

import torch
from torch.nn.functional import linear

__all__ = [
    "differentiated_twice",
    "no_autocast",
    "rotate_scatter",
    "rotated_linears",
    "sample_grid",
    "sample_silu_linear",
    "silu",
    "silu_linear",
]

_TWICE: contextvars.ContextVar[bool] = contextvars.ContextVar("differentiated_twice", default=False)


@contextlib.contextmanager
def differentiated_twice() -> Iterator[None]:
    """Within this context the operations here are built for a graph that will be
    differentiated twice (forces by ``create_graph``, then a loss on them).

    The memory-lean functions recompute activations in backward; a second derivative would
    then differentiate each recomputation as well, and their derivative formulas are chains of
    small operations. Here the plain PyTorch chains are used instead (they keep their
    activations, and PyTorch's own double-backward formulas are lean), with the SiLU's
    derivatives fused (:func:`silu`). ``benchmarks/bench_model.py`` measures the difference."""
    token = _TWICE.set(True)
    try:
        yield
    finally:
        _TWICE.reset(token)


def _promoted(*tensors: torch.Tensor | None) -> torch.dtype:
    """The promoted dtype of the floating tensors given."""
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors if t is not None and t.is_floating_point()))


def _matmul_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """Where PyTorch's autocast would run a matrix product in lower precision, do the same:
    autocast's dtype when it is on for these tensors' device, else the promoted dtype."""
    device = next(t for t in tensors if t is not None).device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return _promoted(*tensors)


def _cast(dtype: torch.dtype, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors]


def no_autocast(reference: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off on ``reference``'s device. The hand-written functions compute in the dtype
    they chose in forward, in forward and in backward alike (plain autograd Functions would run
    their backward outside autocast); the model's geometry and frames use it too."""
    return torch.autocast(device_type=reference.device.type, enabled=False)


def _wanted(ctx) -> tuple[bool, ...]:  # noqa: ANN001
    """Which inputs' gradients this backward must compute.

    ``ctx.needs_input_grad`` says which inputs require a gradient at all; when the engine was
    asked for the gradients of some tensors only (``torch.autograd.grad(E, positions)``, the
    forces of an energy-conserving model), the parameters' gradients are never used, and
    computing them (and recording their graph under ``create_graph``) is a third of the work."""
    if _will_execute is None:
        return tuple(ctx.needs_input_grad)
    # next_functions has one entry per tensor input (None is not one), in order
    edges = iter(ctx.next_functions)
    wanted = []
    for need, is_tensor in zip(ctx.needs_input_grad, ctx.tensor_inputs):
        node = next(edges)[0] if is_tensor else None
        wanted.append(bool(need and node is not None and _engine_needs(node)))
    return tuple(wanted)


def _engine_needs(node) -> bool:  # noqa: ANN001
    try:
        return bool(_will_execute(node))
    except RuntimeError:  # a leaf asked for by autograd.grad: PyTorch cannot tell, so compute it
        return True


def _remember_inputs(ctx, args: tuple) -> None:  # noqa: ANN001
    """Record which ``forward`` arguments are tensors, for :func:`_wanted`."""
    ctx.tensor_inputs = tuple(isinstance(a, torch.Tensor) for a in args)


_will_execute = getattr(torch._C, "_will_engine_execute_node", None)


class _SiLUGrad(torch.autograd.Function):
    """``grad * silu'(x)`` with aten's fused kernel, differentiable once more (the force loss of
    an energy-conserving model differentiates the backward pass): one node instead of the six
    elementwise operations of the expression, none of whose intermediates are kept."""

    @staticmethod
    def forward(ctx, grad, x):  # noqa: ANN001, ANN205
        _remember_inputs(ctx, (grad, x))
        ctx.save_for_backward(grad, x)
        return torch.ops.aten.silu_backward(grad, x)

    @staticmethod
    def backward(ctx, gg):  # noqa: ANN001, ANN205
        grad, x = ctx.saved_tensors
        need_grad, need_x = _wanted(ctx)
        if torch.is_grad_enabled():  # third derivatives: the plain expression
            s = torch.sigmoid(x)
            d2 = s * (1.0 - s) * (2.0 + x * (1.0 - 2.0 * s))
            return (_silu_backward(gg, x) if need_grad else None, gg * grad * d2 if need_x else None)
        grad_grad = torch.ops.aten.silu_backward(gg, x) if need_grad else None
        grad_x = None
        if need_x:
            # silu''(x) = s (1 - s) (2 + x - 2 x s): six passes over the tensor, two temporaries
            s = torch.sigmoid(x)
            u = torch.addcmul(x, x, s, value=-2.0).add_(2.0).mul_(gg).mul_(grad)
            grad_x = torch.ops.aten.sigmoid_backward(u, s)
        return grad_grad, grad_x


def _silu_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``grad * silu'(x)``: aten's fused kernel, through :class:`_SiLUGrad` when a graph is
    being recorded (the kernel has no derivative of its own)."""
    if not torch.is_grad_enabled():
        return torch.ops.aten.silu_backward(grad, x)
    return _SiLUGrad.apply(grad, x)


class _SiLU(torch.autograd.Function):
    """SiLU whose derivative is :class:`_SiLUGrad` (fused, and differentiable once more)."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        ctx.save_for_backward(x)
        return torch.nn.functional.silu(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        (x,) = ctx.saved_tensors
        return _silu_backward(grad, x)


def silu(x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(x)``; under :func:`differentiated_twice`, with fused first and second
    derivatives (PyTorch's SiLU differentiates its derivative as six elementwise operations)."""
    if _TWICE.get() and torch.is_grad_enabled():
        return _SiLU.apply(x)
    return torch.nn.functional.silu(x)


def _gather_pair(x: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[E, B, 2C]``: ``cat([x[source], x[target]], dim=2)`` for ``x`` of shape ``[N, B, C]``.

    Gathered as rows of the ``[N * B, C]`` table in one ``index_select``: concatenating two
    gathers along the channel dimension costs about four times as much on the CPU."""
    num_nodes, num_coefficients, channels = x.shape
    offsets = torch.arange(num_coefficients, device=x.device)
    rows = torch.stack([source[:, None] * num_coefficients + offsets, target[:, None] * num_coefficients + offsets], dim=2)
    return x.reshape(num_nodes * num_coefficients, channels).index_select(0, rows.view(-1)).view(
        source.shape[0], num_coefficients, 2 * channels  # shape[0], not len(): stays symbolic under export
    )


def _rotate_pair(wigner: torch.Tensor, x: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[E, K, 2C]``: ``wigner @ x[source]`` in channels ``:C``, ``wigner @ x[target]`` after."""
    return torch.bmm(wigner, _gather_pair(x, source, target))


class _RotatedLinears(torch.autograd.Function):
    """Rotate both end points of every edge into its frame, then apply linear maps to column
    spans of the flattened result, without keeping that ``[E, K * 2C]`` tensor (the largest of
    a message block): it is recomputed from ``x`` in backward. Rotating both end points in one
    product also halves the number of small matrix products."""

    @staticmethod
    def forward(ctx, wigner, x, source, target, spans, *weights_and_biases):  # noqa: ANN001, ANN205
        _remember_inputs(ctx, (wigner, x, source, target, spans, *weights_and_biases))
        ctx.rotation_dtype = _promoted(wigner, x)  # rotations in full precision, also under autocast
        ctx.dtype = _matmul_dtype(x, weights_and_biases[0])
        ctx.spans = spans
        ctx.has_bias = [b is not None for b in weights_and_biases[1::2]]
        ctx.save_for_backward(wigner, x, source, target, *weights_and_biases[0::2])
        return _rotated_linears_chain(
            wigner, x, source, target, spans, weights_and_biases[0::2], weights_and_biases[1::2]
        )

    @staticmethod
    def backward(ctx, *grads):  # noqa: ANN001, ANN205
        with no_autocast(grads[0]):
            return _RotatedLinears._backward(ctx, grads)

    @staticmethod
    def _backward(ctx, grads):  # noqa: ANN001, ANN205
        wigner, x, source, target, *weights = ctx.saved_tensors
        wanted = _wanted(ctx)
        wigner_r, x_r = _cast(ctx.rotation_dtype, wigner, x)
        gathered = _gather_pair(x_r, source, target)  # [E, B, 2C]
        rotated = torch.bmm(wigner_r, gathered)  # [E, K, 2C], recomputed
        if not wanted[0]:
            gathered = None  # only the Wigner gradient needs it again
        pair = rotated.flatten(1).to(ctx.dtype)
        grad_weights_and_biases = []
        grad_pair = []
        for k, ((lo, hi), weight, has_bias, grad) in enumerate(zip(ctx.spans, weights, ctx.has_bias, grads)):
            grad = grad.to(ctx.dtype)
            need_weight, need_bias = wanted[5 + 2 * k], wanted[6 + 2 * k]
            grad_weights_and_biases.append(grad.t() @ pair[:, lo:hi] if need_weight else None)
            grad_weights_and_biases.append(grad.sum(0) if has_bias and need_bias else None)
            grad_pair.append(grad @ weight.to(ctx.dtype))
        grad_rotated = torch.cat(grad_pair, dim=1).view_as(rotated).to(ctx.rotation_dtype)
        grad_wigner = grad_x = None
        if wanted[0]:
            grad_wigner = torch.bmm(grad_rotated, gathered.transpose(1, 2))
        if wanted[1]:
            both = torch.bmm(wigner_r.transpose(1, 2), grad_rotated)  # [E, B, 2C]
            c = x.shape[2]
            # contiguous halves: index_add of a strided source falls off PyTorch's fast CPU path (5x slower)
            grad_x = torch.zeros_like(x_r).index_add_(0, source, both[..., :c].contiguous())
            grad_x.index_add_(0, target, both[..., c:].contiguous())
        return (grad_wigner, grad_x, None, None, None, *grad_weights_and_biases)


def _rotated_linears_chain(wigner, x, source, target, spans, weights, biases) -> tuple[torch.Tensor, ...]:  # noqa: ANN001
    """What :func:`rotated_linears` computes, as plain operations: the rotation in full precision,
    the linear maps in autocast's dtype when it is on (the forward of :class:`_RotatedLinears`,
    and the path that is differentiated twice)."""
    rotation_dtype, dtype = _promoted(wigner, x), _matmul_dtype(x, weights[0])
    with no_autocast(x):
        wigner, x = _cast(rotation_dtype, wigner, x)
        pair = _rotate_pair(wigner, x, source, target).flatten(1).to(dtype)
        outputs = []
        for (lo, hi), weight, bias in zip(spans, weights, biases):
            weight, bias = _cast(dtype, weight, bias)
            outputs.append(linear(pair[:, lo:hi], weight, bias))
    return tuple(outputs)


def rotated_linears(
    wigner: torch.Tensor,
    x: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
    spans: list[tuple[int, int]],
    weights: list[torch.Tensor],
    biases: list[torch.Tensor | None],
) -> tuple[torch.Tensor, ...]:
    """Linear maps of column spans of each edge's rotated end-point coefficients.

    Args:
        wigner: ``[E, K, B]`` rows of each edge's Wigner-D matrix.
        x: ``[N, B, C]`` node coefficients.
        source, target: ``[E]`` end points of each edge.
        spans: ``(start, stop)`` column ranges of the flattened ``[E, K * 2C]`` rotated pair
            (coefficient-major; within a coefficient, the source's C channels, then the
            target's); they must tile the columns in order.
        weights, biases: one ``[G_i, stop_i - start_i]`` weight and ``[G_i]`` bias (or None)
            per span.

    Returns:
        ``[E, G_i]`` per span: ``pair[:, start_i:stop_i] @ weight_i^T + bias_i``.
    """
    if [lo for lo, _ in spans[1:]] != [hi for _, hi in spans[:-1]] or spans[0][0] != 0:
        raise ValueError(f"spans must tile the columns in order, got {spans}")
    if _TWICE.get():
        return _rotated_linears_chain(wigner, x, source, target, spans, weights, biases)
    args = [t for pair in zip(weights, biases) for t in pair]
    return _RotatedLinears.apply(wigner, x, source, target, tuple(spans), *args)


class _RotateScatter(torch.autograd.Function):
    """``out = zeros(N, B, C).index_add(0, index, D^T @ m)``.

    PyTorch's ``index_add`` keeps its whole ``[E, B, C]`` source for backward (to know its
    shape); here nothing per-edge is saved except ``m`` when ``D`` needs a gradient.
    """

    @staticmethod
    def forward(ctx, wigner: torch.Tensor, message: torch.Tensor, index: torch.Tensor, num_nodes: int):  # noqa: ANN001, ANN205
        _remember_inputs(ctx, (wigner, message, index, num_nodes))
        ctx.dtype = _promoted(wigner, message)  # sums over many edges: full precision
        ctx.save_for_backward(wigner, message if ctx.needs_input_grad[0] else None, index)
        return _rotate_scatter_chain(wigner, message, index, num_nodes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        with no_autocast(grad):
            return _RotateScatter._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        wigner, message, index = _cast(ctx.dtype, *ctx.saved_tensors)
        need_wigner, need_message = _wanted(ctx)[:2]
        gathered = grad.to(ctx.dtype).index_select(0, index)  # [E, B, C]; faster than [index] on the CPU
        grad_wigner = grad_message = None
        if need_wigner:
            grad_wigner = torch.bmm(message, gathered.transpose(1, 2))
        if need_message:
            grad_message = torch.bmm(wigner, gathered)
        return grad_wigner, grad_message, None, None


def _rotate_scatter_chain(wigner: torch.Tensor, message: torch.Tensor, index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """What :func:`rotate_scatter` computes, as plain operations, in full precision (sums over
    many edges)."""
    with no_autocast(message):
        wigner, message = _cast(_promoted(wigner, message), wigner, message)
        rotated = torch.bmm(wigner.transpose(1, 2), message)
        return message.new_zeros(num_nodes, wigner.shape[2], message.shape[2]).index_add_(0, index, rotated)


def rotate_scatter(wigner: torch.Tensor, message: torch.Tensor, index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Rotate edge-frame messages back to the global frame and sum them at their target nodes.

    Args:
        wigner: ``[E, K, B]`` rows of each edge's Wigner-D matrix.
        message: ``[E, K, C]`` messages in the edge frame.
        index: ``[E]`` target node of each edge.
        num_nodes: N.

    Returns:
        ``[N, B, C]`` = ``sum_{e: index[e] = n} wigner[e]^T @ message[e]``.
    """
    if _TWICE.get():
        return _rotate_scatter_chain(wigner, message, index, num_nodes)
    return _RotateScatter.apply(wigner, message, index, num_nodes)


class _SiLULinear(torch.autograd.Function):
    """``linear(silu(x) * scale, W, b)``, optionally followed by SiLU, saving only ``x`` and
    ``scale``: the activation is recomputed in backward, and with the output SiLU so is the
    linear layer's output (one more matrix product instead of keeping ``[..., G]``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, output_silu):  # noqa: ANN001, ANN205
        _remember_inputs(ctx, (x, weight, bias, scale, output_silu))
        ctx.dtype = _matmul_dtype(x, weight)
        ctx.save_for_backward(x, weight, bias, scale)
        ctx.output_silu = output_silu
        return _silu_linear_chain(x, weight, bias, scale, output_silu)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        with no_autocast(grad):
            return _SiLULinear._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):  # noqa: ANN001, ANN205
        x, weight, bias, scale = _cast(ctx.dtype, *ctx.saved_tensors)
        grad = grad.to(ctx.dtype)
        need_x, need_weight, need_bias, need_scale, _ = _wanted(ctx)
        grad_x = grad_weight = grad_bias = grad_scale = None
        if need_weight or need_scale or ctx.output_silu:
            act = torch.nn.functional.silu(x)
        if need_weight or ctx.output_silu:
            a = act if scale is None else act * scale  # the linear layer's input
        if ctx.output_silu:
            grad = _silu_backward(grad, linear(a, weight, bias))
        if need_x or need_scale:
            grad_a = torch.matmul(grad, weight)
        if need_x:
            grad_x = _silu_backward(grad_a if scale is None else grad_a * scale, x)
        if need_scale:
            grad_scale = _sum_to(grad_a * act, scale.shape)
        if need_weight:
            grad_weight = torch.matmul(grad.reshape(-1, grad.shape[-1]).t(), a.reshape(-1, a.shape[-1]))
        if bias is not None and need_bias:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_weight, grad_bias, grad_scale, None


def _silu_linear_chain(x, weight, bias, scale, output_silu: bool) -> torch.Tensor:  # noqa: ANN001
    """What :func:`silu_linear` computes, as plain operations, in autocast's dtype when it is on."""
    with no_autocast(x):
        x, weight, bias, scale = _cast(_matmul_dtype(x, weight), x, weight, bias, scale)
        a = silu(x)
        out = linear(a if scale is None else a * scale, weight, bias)
        return silu(out) if output_silu else out


class _SampleSiLULinear(torch.autograd.Function):
    """``linear(silu(G @ z + b_1), W_2, b_2)`` per grid point, saving only the small
    coefficient-space ``z``: the grid pre-activations are recomputed in backward (one product
    with the sampling matrix) instead of being kept."""

    @staticmethod
    def forward(ctx, z, sample, bias1, weight2, bias2):  # noqa: ANN001, ANN205
        _remember_inputs(ctx, (z, sample, bias1, weight2, bias2))
        ctx.dtype = _matmul_dtype(z, weight2)
        ctx.save_for_backward(z, sample, bias1, weight2)
        return _sample_silu_linear_chain(z, sample, bias1, weight2, bias2)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        with no_autocast(grad):
            return _SampleSiLULinear._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):  # noqa: ANN001, ANN205
        z, sample, bias1, weight2 = _cast(ctx.dtype, *ctx.saved_tensors)
        grad = grad.to(ctx.dtype)
        need_z, _, need_bias1, need_weight2, need_bias2 = _wanted(ctx)
        pre = sample_grid(z, sample, bias1)  # [P, N, F]
        flat_grad = grad.reshape(-1, grad.shape[-1])
        grad_z = grad_bias1 = grad_weight2 = grad_bias2 = None
        if need_weight2:
            act = torch.nn.functional.silu(pre)
            grad_weight2 = torch.matmul(flat_grad.t(), act.reshape(-1, act.shape[-1]))
        if need_bias2:
            grad_bias2 = flat_grad.sum(0)
        if need_z or need_bias1:
            grad_pre = _silu_backward(torch.matmul(grad, weight2), pre)
            if need_bias1:
                grad_bias1 = grad_pre.reshape(-1, grad_pre.shape[-1]).sum(0)
            if need_z:
                grad_z = torch.mm(sample.t(), grad_pre.reshape(sample.shape[0], -1)).view_as(z)
        return grad_z, None, grad_bias1, grad_weight2, grad_bias2


def sample_grid(z: torch.Tensor, sample: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``[B, N, F]`` coefficients -> ``[P, N, F]`` grid values plus ``bias``."""
    num_coeff, num_nodes, features = z.shape
    values = torch.mm(sample, z.reshape(num_coeff, num_nodes * features))
    return values.view(-1, num_nodes, features) + bias


def _sample_silu_linear_chain(z, sample, bias1, weight2, bias2) -> torch.Tensor:  # noqa: ANN001
    """What :func:`sample_silu_linear` computes, as plain operations, in autocast's dtype when it is on."""
    with no_autocast(z):
        z, sample, bias1, weight2, bias2 = _cast(_matmul_dtype(z, weight2), z, sample, bias1, weight2, bias2)
        return linear(silu(sample_grid(z, sample, bias1)), weight2, bias2)


def sample_silu_linear(
    z: torch.Tensor, sample: torch.Tensor, bias1: torch.Tensor, weight2: torch.Tensor, bias2: torch.Tensor
) -> torch.Tensor:
    """Sample coefficient-space features on a grid, add a bias, SiLU, then a linear layer.

    Args:
        z: ``[B, N, F]`` features per coefficient (already mixed by the first 1x1 layer).
        sample: ``[P, B]`` sampling matrix (a constant: no gradient).
        bias1: ``[F]``; weight2: ``[G, F]``; bias2: ``[G]``.

    Returns:
        ``[P, N, G]`` = ``linear(silu(sample @ z + bias1), weight2, bias2)``.
    """
    if _TWICE.get():
        return _sample_silu_linear_chain(z, sample, bias1, weight2, bias2)
    return _SampleSiLULinear.apply(z, sample, bias1, weight2, bias2)


def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a broadcast result back to ``shape`` (the inverse of broadcasting)."""
    lead = t.dim() - len(shape)
    if lead:
        t = t.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, size in enumerate(shape) if size == 1 and t.shape[i] != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


def silu_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    output_silu: bool = False,
) -> torch.Tensor:
    """``linear(silu(x) * scale, weight, bias)`` (then ``silu`` if ``output_silu``), keeping only
    ``x`` for backward.

    Args:
        x: ``[..., F]`` pre-activations.
        weight: ``[G, F]``; bias: ``[G]`` or None.
        scale: optional multiplier broadcastable to ``x`` (SCN's edge gate).
        output_silu: apply SiLU to the result too; its input is then recomputed in backward.

    Returns:
        ``[..., G]``.
    """
    if _TWICE.get():
        return _silu_linear_chain(x, weight, bias, scale, output_silu)
    return _SiLULinear.apply(x, weight, bias, scale, output_silu)

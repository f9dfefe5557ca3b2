"""The hand-written autograd functions equal the PyTorch chains they replace, to second order,
on both paths: the memory-lean one and the one built to be differentiated twice."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.utils.flop_counter import FlopCounterMode

from spherical_channels.models.ops import (
    differentiated_twice,
    rotate_scatter,
    rotated_linears,
    sample_silu_linear,
    silu,
    silu_linear,
)


@pytest.fixture(autouse=True, params=["lean", "twice"])
def path(request: pytest.FixtureRequest):
    """Every test here runs on both paths of the operations."""
    with differentiated_twice() if request.param == "twice" else contextlib.nullcontext():
        yield request.param


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    kw = dict(generator=g, dtype=torch.float64)
    n, e, k, b, c = 4, 9, 3, 5, 2
    wigner = torch.randn(e, k, b, **kw)
    x = torch.randn(n, b, c, **kw)
    message = torch.randn(e, k, c, **kw)
    index = torch.randint(0, n, (e,), generator=g)
    return wigner, x, message, index, n


def test_rotated_linears_match_reference() -> None:
    """Rotate both end points, flatten, linear maps of column spans (with and without bias)."""
    wigner, x, _, index, n = _data()
    g = torch.Generator().manual_seed(5)
    other = torch.randint(0, n, index.shape, generator=g)
    width = wigner.shape[1] * 2 * x.shape[2]  # K * 2C = 12
    spans = [(0, 4), (4, width)]
    weights = [torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(2, width - 4, generator=g, dtype=torch.float64)]
    biases = [torch.randn(3, generator=g, dtype=torch.float64), None]
    pair = torch.cat([torch.bmm(wigner, x[index]), torch.bmm(wigner, x[other])], dim=2).flatten(1)
    got = rotated_linears(wigner, x, index, other, spans, weights, biases)
    torch.testing.assert_close(got[0], pair[:, :4] @ weights[0].T + biases[0], atol=1e-13, rtol=0)
    torch.testing.assert_close(got[1], pair[:, 4:] @ weights[1].T, atol=1e-13, rtol=0)
    inputs = (wigner.requires_grad_(), x.requires_grad_(), weights[0].requires_grad_(), biases[0].requires_grad_(), weights[1].requires_grad_())

    def fn(w, v, w0, b0, w1):
        return rotated_linears(w, v, index, other, spans, [w0, w1], [b0, None])

    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)
    with pytest.raises(ValueError, match="tile"):
        rotated_linears(wigner, x, index, other, [(0, 4), (5, width)], weights, biases)


def test_rotate_scatter_matches_reference() -> None:
    wigner, _, message, index, n = _data(1)
    reference = torch.zeros(n, wigner.shape[2], message.shape[2], dtype=torch.float64).index_add(
        0, index, torch.bmm(wigner.transpose(1, 2), message)
    )
    torch.testing.assert_close(rotate_scatter(wigner, message, index, n), reference, atol=1e-14, rtol=0)
    wigner.requires_grad_()
    message.requires_grad_()
    assert gradcheck(lambda w, m: rotate_scatter(w, m, index, n), (wigner, message))
    assert gradgradcheck(lambda w, m: rotate_scatter(w, m, index, n), (wigner, message))


def test_rotate_scatter_without_wigner_gradient() -> None:
    """The direct-force path: only the message needs a gradient (nothing per-edge is saved)."""
    wigner, _, message, index, n = _data(2)
    message.requires_grad_()
    assert gradcheck(lambda m: rotate_scatter(wigner, m, index, n), (message,))


@pytest.mark.parametrize("output_silu", [False, True])
@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_silu_linear_matches_reference(with_scale: bool, with_bias: bool, output_silu: bool) -> None:
    g = torch.Generator().manual_seed(3)
    kw = dict(generator=g, dtype=torch.float64)
    x = torch.randn(3, 5, 4, **kw)
    weight = torch.randn(6, 4, **kw)
    bias = torch.randn(6, **kw) if with_bias else None
    scale = torch.randn(5, 4, **kw) if with_scale else None  # broadcast over the leading dim
    act = torch.nn.functional.silu(x) * (scale if with_scale else 1.0)
    reference = torch.nn.functional.linear(act, weight, bias)
    if output_silu:
        reference = torch.nn.functional.silu(reference)
    torch.testing.assert_close(silu_linear(x, weight, bias, scale, output_silu), reference, atol=1e-14, rtol=0)
    inputs = [t.requires_grad_() for t in (x, weight, bias, scale) if t is not None]

    def fn(*args):
        it = iter(args)
        return silu_linear(
            next(it), next(it), next(it) if with_bias else None, next(it) if with_scale else None, output_silu
        )

    assert gradcheck(fn, tuple(inputs))
    assert gradgradcheck(fn, tuple(inputs))


def test_sample_silu_linear_matches_reference() -> None:
    g = torch.Generator().manual_seed(4)
    kw = dict(generator=g, dtype=torch.float64)
    z = torch.randn(5, 3, 4, **kw)  # [B, N, F]
    sample = torch.randn(7, 5, **kw)  # [P, B]
    bias1, weight2, bias2 = torch.randn(4, **kw), torch.randn(6, 4, **kw), torch.randn(6, **kw)
    pre = torch.einsum("pb,bnf->pnf", sample, z) + bias1
    reference = torch.nn.functional.linear(torch.nn.functional.silu(pre), weight2, bias2)
    torch.testing.assert_close(sample_silu_linear(z, sample, bias1, weight2, bias2), reference, atol=1e-13, rtol=0)
    inputs = tuple(t.requires_grad_() for t in (z, bias1, weight2, bias2))

    def fn(z, b1, w2, b2):
        return sample_silu_linear(z, sample, b1, w2, b2)

    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


def test_silu_has_fused_derivatives_to_third_order(path: str) -> None:
    g = torch.Generator().manual_seed(6)
    x = (3 * torch.randn(40, generator=g, dtype=torch.float64)).requires_grad_()
    torch.testing.assert_close(silu(x), torch.nn.functional.silu(x), atol=1e-15, rtol=0)
    assert gradcheck(silu, (x,))
    assert gradgradcheck(silu, (x,))
    derivatives = []
    for fn in (silu, torch.nn.functional.silu):
        (d1,) = torch.autograd.grad(fn(x).sum(), x, create_graph=True)
        (d2,) = torch.autograd.grad(d1.sum(), x, create_graph=True)
        (d3,) = torch.autograd.grad(d2.sum(), x)
        derivatives.append((d1, d2, d3))
    for ours, torchs in zip(*derivatives):
        torch.testing.assert_close(ours, torchs, atol=1e-13, rtol=0)


def test_position_gradients_alone_skip_the_parameter_products(path: str) -> None:
    """``autograd.grad(E, x)`` (an energy-conserving model's forces) computes no weight
    gradients: fewer FLOPs than asking for the weights too, and the same gradient (on the
    twice-differentiated path PyTorch's own formulas prune them)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(50, 5, 16, generator=g, requires_grad=True)
    weight = torch.randn(32, 16, generator=g, requires_grad=True)
    scale = torch.randn(5, 16, generator=g)

    def grads(inputs):
        out = silu_linear(x, weight, None, scale, output_silu=True).sum()
        with FlopCounterMode(display=False) as counter:
            result = torch.autograd.grad(out, inputs)
        return result[0], counter.get_total_flops()

    grad_x_alone, flops_alone = grads([x])
    grad_x_both, flops_both = grads([x, weight])
    torch.testing.assert_close(grad_x_alone, grad_x_both, atol=0, rtol=0)
    assert flops_alone < flops_both

"""Taps: the official mmax = 1 combination, and exact roll-equivariance for any mmax."""

import math

import pytest
import torch

from spherical_channels.models.blocks import MessageBlock
from spherical_channels.so3.frames import fixed_roll_frames, roll_about_y
from spherical_channels.so3.harmonics import num_coefficients, reduced_coefficients
from spherical_channels.so3.taps import TapCombiner, resolve_num_taps
from spherical_channels.so3.wigner import WignerD


def test_number_of_taps() -> None:
    assert resolve_num_taps(-1, 0) == 1
    assert resolve_num_taps(-1, 1) == 4
    assert resolve_num_taps(-1, 2) == 8
    assert resolve_num_taps(1, 2) == 1
    with pytest.raises(ValueError):
        resolve_num_taps(0, 1)


def test_mmax1_combination_is_the_official_one() -> None:
    """Paper eqs. 7-9 as the official code writes them for mmax = 1 and 4 taps."""
    lmax = 4
    taps = TapCombiner(lmax, 1, -1).double()  # official coefficient order
    k, t = taps.num_kept, 4
    angles = [0.0, 0.5 * math.pi, math.pi, 1.5 * math.pi]
    expected = torch.zeros(t * k, k, dtype=torch.float64)
    for l in range(lmax + 1):  # m = 0: average
        offset = 0 if l == 0 else (l - 1) * 3 + 2
        for y in range(t):
            expected[offset + y * k, offset] = 1 / t
    for l in range(1, lmax + 1):
        minus, plus = (l - 1) * 3 + 1, (l - 1) * 3 + 3
        for y in range(t):
            c, s = math.cos(angles[y]) / t, math.sin(angles[y]) / t
            expected[minus + y * k, minus], expected[plus + y * k, minus] = c, s
            expected[plus + y * k, plus], expected[minus + y * k, plus] = c, -s
    torch.testing.assert_close(taps.combine, expected, atol=1e-15, rtol=0)


@pytest.mark.parametrize("mmax,num_taps", [(1, -1), (2, -1), (3, -1), (1, 3), (2, 5), (2, 2), (1, 1)])
@pytest.mark.parametrize("order", ["official", "grouped"])
def test_combinations_equal_the_reference_map(mmax: int, num_taps: int, order: str) -> None:
    """``combine_taps`` and, for identical taps, ``combine_identical_taps`` on its selected rows
    equal the contraction with the reference ``combine`` matrix (mean_t D_t^T F_t)."""
    from spherical_channels.so3.harmonics import grouped_reduced_coefficients

    lmax = 5
    kept = reduced_coefficients(lmax, mmax) if order == "official" else grouped_reduced_coefficients(lmax, mmax)
    taps = TapCombiner(lmax, mmax, num_taps, coefficients=kept).double()
    t, k, c, e = taps.num_taps, len(kept), 3, 7
    g = torch.Generator().manual_seed(mmax)
    messages = torch.randn(e, t, k, c, dtype=torch.float64, generator=g)
    reference = torch.einsum("etjc,tjk->ekc", messages, taps.combine.view(t, k, k))
    torch.testing.assert_close(taps.combine_taps(messages), reference, atol=1e-14, rtol=0)

    same = messages[:, :1].expand(e, t, k, c)  # every tap the same output
    reference = torch.einsum("etjc,tjk->ekc", same, taps.combine.view(t, k, k))
    rows = taps.identical_taps_rows
    got = taps.combine_identical_taps(same[:, 0, rows])
    torch.testing.assert_close(got, reference[:, rows], atol=1e-14, rtol=0)
    others = torch.ones(k, dtype=torch.bool)
    others[rows] = False
    assert torch.all(reference[:, others].abs() < 1e-14)  # rows not selected are zero
    if num_taps == -1:  # equally spaced 4 mmax taps: only m = 0 survives
        assert len(rows) == lmax + 1 and taps.identical_taps_select


def message_with_frames(block: MessageBlock, x, edge_features, edge_index, frames) -> torch.Tensor:
    wigner = WignerD(block.lmax, block.kept).double()
    return block(x, edge_features, edge_index, wigner(frames))


def setup_edges(lmax: int, channels: int = 3, num_edges: int = 12):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, num_coefficients(lmax), channels, generator=g, dtype=torch.float64)
    edge_index = torch.randint(0, 5, (2, num_edges), generator=g)
    edge_features = torch.randn(num_edges, 4, generator=g, dtype=torch.float64)
    frames = fixed_roll_frames(torch.randn(num_edges, 3, generator=g, dtype=torch.float64))
    roll = roll_about_y(torch.rand(num_edges, generator=g, dtype=torch.float64) * 2 * math.pi)
    return x, edge_features, edge_index, frames, roll @ frames


def test_m0_message_is_independent_of_the_roll() -> None:
    lmax = 4
    torch.manual_seed(0)
    block = MessageBlock(lmax=lmax, mmax=0, num_taps=-1, channels=3, hidden_channels=16, num_basis=4).double()  # with SiLU: F_e non-linear
    x, feats, index, frames, rolled = setup_edges(lmax)
    a = message_with_frames(block, x, feats, index, frames)
    b = message_with_frames(block, x, feats, index, rolled)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("mmax", [1, 2])
def test_tapped_linear_message_is_roll_equivariant(mmax: int) -> None:
    lmax = 4
    torch.manual_seed(0)
    block = MessageBlock(lmax=lmax, mmax=mmax, num_taps=-1, channels=3, hidden_channels=16, num_basis=4).double()
    block.activation = torch.nn.Identity()  # F_e linear in the rotated coefficients
    assert block.taps.num_taps == 4 * mmax
    x, feats, index, frames, rolled = setup_edges(lmax)
    a = message_with_frames(block, x, feats, index, frames)
    b = message_with_frames(block, x, feats, index, rolled)
    assert a.abs().max() > 1e-2
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("mmax", [1, 2])
def test_one_tap_message_depends_on_the_roll(mmax: int) -> None:
    """Without taps the same check fails: the test above can fail."""
    lmax = 4
    torch.manual_seed(0)
    block = MessageBlock(lmax=lmax, mmax=mmax, num_taps=1, channels=3, hidden_channels=16, num_basis=4).double()
    block.activation = torch.nn.Identity()
    x, feats, index, frames, rolled = setup_edges(lmax)
    a = message_with_frames(block, x, feats, index, frames)
    b = message_with_frames(block, x, feats, index, rolled)
    assert (a - b).abs().max() > 1e-3


def test_roll_wigner_matches_e3nn() -> None:
    from e3nn import o3

    from spherical_channels.so3.constants import float64_default
    from spherical_channels.so3.taps import roll_wigner

    angles = torch.tensor([0.37, 2.1], dtype=torch.float64)
    lmax, mmax = 5, 3
    kept = reduced_coefficients(lmax, mmax)
    with float64_default():
        for t, rotation in enumerate(roll_about_y(angles)):
            abc = o3.matrix_to_angles(rotation)
            full = torch.block_diag(*[o3.wigner_D(l, *abc) for l in range(lmax + 1)])
            torch.testing.assert_close(roll_wigner(lmax, mmax, angles)[t], full[kept][:, kept], atol=1e-6, rtol=0)

"""Multi-tap message evaluation (paper eqs. 6-9), for any mmax.

The message network F_e is evaluated at T rolls phi_t about the edge axis and the outputs are
brought back to the common frame and averaged:

    m = (1/T) sum_t D_y(phi_t)^T F_e(D_y(phi_t) x)

where D_y(phi) is the Wigner-D of the roll restricted to the kept coefficients (|m| <= mmax). A
roll about the polar axis only mixes the (l, m) and (l, -m) coefficients, with cos(m phi) and
sin(m phi), so D_y restricted to the kept set is exact. For mmax = 1 this is the official
combination (m = 0 averaged; the +-1 pair combined with cos and sin weights). Averaging over T
equally spaced rolls removes every roll frequency that is not a multiple of T; a linear F_e on
coefficients with |m| <= M only carries frequencies up to 2M, so T = 4M taps (the paper's
choice: 4 for mmax = 1, 8 for mmax = 2) make the combined message of a linear F_e exactly
roll-equivariant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from .constants import ConstantsModule
from .harmonics import reduced_coefficients

__all__ = ["resolve_num_taps", "tap_angles", "roll_wigner", "TapCombiner"]

# cos / sin sums that vanish mathematically come out ~1e-17 in float64.
_ZERO = 1e-12


def resolve_num_taps(num_taps: int, mmax: int) -> int:
    """Number of taps: 1 if ``num_taps == 1`` or ``mmax == 0`` (nothing to combine), ``4 * mmax``
    for the automatic choice ``num_taps == -1``, otherwise ``num_taps`` itself."""
    if mmax == 0 or num_taps == 1:
        return 1
    if num_taps == -1:
        return 4 * mmax
    if num_taps < 1:
        raise ValueError(f"num_taps must be -1 (automatic) or >= 1, got {num_taps}")
    return num_taps


def tap_angles(num_taps: int) -> torch.Tensor:
    """Equally spaced roll angles 2 pi t / T, float64 ``[T]``."""
    return torch.arange(num_taps, dtype=torch.float64) * (2.0 * math.pi / num_taps)


def roll_wigner(
    lmax: int, mmax: int, angles: torch.Tensor, coefficients: Sequence[int] | None = None
) -> torch.Tensor:
    """Wigner-D of rolls about the polar axis (:func:`~.frames.roll_about_y`), restricted to
    the kept coefficients: float64 ``[T, K, K]``.

    A roll by phi acts on each pair (l, -m), (l, m) as [[cos m phi, -sin m phi],
    [sin m phi, cos m phi]] and leaves m = 0 alone (checked against e3nn in the tests). Written
    in closed form so the constants are exact in float64. ``coefficients``: the kept flat
    indices in the order wanted (default: :func:`~.harmonics.reduced_coefficients`).
    """
    kept = list(coefficients) if coefficients is not None else reduced_coefficients(lmax, mmax)
    position = {index: k for k, index in enumerate(kept)}
    out = torch.zeros(len(angles), len(kept), len(kept), dtype=torch.float64)
    for l in range(lmax + 1):
        out[:, position[l * l + l], position[l * l + l]] = 1.0
        for m in range(1, min(l, mmax) + 1):
            minus, plus = position[l * l + l - m], position[l * l + l + m]
            c, s = torch.cos(m * angles), torch.sin(m * angles)
            out[:, minus, minus], out[:, minus, plus] = c, -s
            out[:, plus, minus], out[:, plus, plus] = s, c
    return out


class TapCombiner(ConstantsModule):
    """Constants for evaluating a message at several rolls and combining the results.

    Args:
        lmax, mmax, num_taps: as in the model (``num_taps=-1``: 4 * mmax taps).
        coefficients: the kept coefficients' flat indices, in the order the message block uses
            (default: :func:`~.harmonics.reduced_coefficients`).

    Buffers:
        ``tap_wigner``: ``[T, K, K]``: kept coefficients in the edge frame -> in tap t's frame.
        ``combine``: ``[T * K, K]``: stacked tap outputs -> combined output, i.e.
        ``out[k] = sum_{t,j} F_t[j] * combine[t*K + j, k]`` (= mean_t D_t^T F_t).
        ``harmonic_weights``: ``[T, 1 + 2 * mmax]``: ``(1, cos phi_t, sin phi_t, cos 2 phi_t,
        sin 2 phi_t, ...)``; a function linear in the rolled coefficients is, at tap t, this
        combination of 1 + 2 * mmax roll-independent terms (see ``MessageBlock``).
    """

    def __init__(
        self, lmax: int, mmax: int, num_taps: int = -1, coefficients: Sequence[int] | None = None
    ) -> None:
        super().__init__()
        self.lmax, self.mmax = lmax, mmax
        self.num_taps = resolve_num_taps(num_taps, mmax)
        self.num_kept = len(reduced_coefficients(lmax, mmax))
        angles = tap_angles(self.num_taps)
        wigner = roll_wigner(lmax, mmax, angles, coefficients)
        combine = wigner.reshape(self.num_taps * self.num_kept, self.num_kept) / self.num_taps
        harmonics = [torch.ones_like(angles)]
        for m in range(1, mmax + 1):
            harmonics += [torch.cos(m * angles), torch.sin(m * angles)]
        self.register_constant("tap_wigner", wigner)
        self.register_constant("combine", combine)
        self.register_constant("harmonic_weights", torch.stack(harmonics, dim=1))

        # When every tap sees the same input (coefficients of degree 0 only: a roll leaves them
        # unchanged), the combination is one [K, K] map, mean_t D_t^T. For equally spaced taps
        # it keeps the m = 0 rows and zeroes the others; only the rows it keeps need computing.
        mean = combine.view(self.num_taps, self.num_kept, self.num_kept).sum(0)
        used = (mean.abs() > _ZERO).any(dim=1) | (mean.abs() > _ZERO).any(dim=0)
        rows = torch.nonzero(used).flatten()
        sub = mean[rows][:, rows]
        self.identical_taps_select = bool(
            torch.allclose(sub, torch.eye(len(rows), dtype=torch.float64), atol=_ZERO, rtol=0)
        )
        if not self.identical_taps_select:
            rows = torch.arange(self.num_kept)
            self.register_constant("identical_taps_map", mean)
        self.register_buffer("identical_taps_rows", rows, persistent=False)

    def combine_identical_taps(self, messages: torch.Tensor) -> torch.Tensor:
        """``[E, R, C]`` output of one tap on rows ``identical_taps_rows`` -> the ``[E, R, C]``
        combination when all taps saw the same input (rows outside ``identical_taps_rows`` are 0)."""
        if self.identical_taps_select:
            return messages
        return torch.matmul(self.identical_taps_map.to(messages.dtype).t(), messages)

    def combine_taps(self, messages: torch.Tensor) -> torch.Tensor:
        """``[E, T, K, C]`` tap outputs -> ``[E, K, C]`` combined message."""
        e, t, k, c = messages.shape
        if t == 1:
            return messages[:, 0]
        return torch.matmul(self.combine.to(messages.dtype).t(), messages.reshape(e, t * k, c))

    def extra_repr(self) -> str:
        return f"lmax={self.lmax}, mmax={self.mmax}, num_taps={self.num_taps}"

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

import torch
from e3nn import o3

from .frames import roll_about_y
from .constants import ConstantsModule, float64_default
from .harmonics import reduced_coefficients

__all__ = ["resolve_num_taps", "tap_angles", "TapCombiner"]


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


def _reduced_roll_wigner(lmax: int, mmax: int, angles: torch.Tensor) -> torch.Tensor:
    """D of each roll restricted to the kept coefficients, float64 ``[T, K, K]``."""
    kept = torch.tensor(reduced_coefficients(lmax, mmax))
    rotations = roll_about_y(angles)
    blocks = []
    with float64_default():
        for rotation in rotations:
            alpha, beta, gamma = o3.matrix_to_angles(rotation)
            full = torch.block_diag(*[o3.wigner_D(l, alpha, beta, gamma) for l in range(lmax + 1)])
            blocks.append(full[kept][:, kept])
    return torch.stack(blocks)


class TapCombiner(ConstantsModule):
    """Constants for evaluating a message at several rolls and combining the results.

    Buffers:
        ``tap_wigner``: ``[T, K, K]``: kept coefficients in the edge frame -> in tap t's frame.
        ``combine``: ``[T * K, K]``: stacked tap outputs -> combined output, i.e.
        ``out[k] = sum_{t,j} F_t[j] * combine[t*K + j, k]`` (= mean_t D_t^T F_t).
    """

    def __init__(self, lmax: int, mmax: int, num_taps: int = -1) -> None:
        super().__init__()
        self.lmax, self.mmax = lmax, mmax
        self.num_taps = resolve_num_taps(num_taps, mmax)
        self.num_kept = len(reduced_coefficients(lmax, mmax))
        wigner = _reduced_roll_wigner(lmax, mmax, tap_angles(self.num_taps))
        # Entries that are mathematically 0 or +-1 come out of Euler angles with 1e-16 noise.
        wigner = torch.where(wigner.abs() < 1e-12, torch.zeros_like(wigner), wigner)
        combine = wigner.reshape(self.num_taps * self.num_kept, self.num_kept) / self.num_taps
        self.register_constant("tap_wigner", wigner)
        self.register_constant("combine", combine)

    def combine_taps(self, messages: torch.Tensor) -> torch.Tensor:
        """``[E, T, K, C]`` tap outputs -> ``[E, K, C]`` combined message."""
        e, t, k, c = messages.shape
        if t == 1:
            return messages[:, 0]
        return torch.matmul(self.combine.to(messages.dtype).t(), messages.reshape(e, t * k, c))

    def extra_repr(self) -> str:
        return f"lmax={self.lmax}, mmax={self.mmax}, num_taps={self.num_taps}"

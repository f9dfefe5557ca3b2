"""Wigner-D matrices of real spherical harmonics in e3nn's (y-polar) convention.

``D = wigner_D(R, lmax)`` satisfies ``D @ Y(x) == Y(R @ x)`` with
``Y = e3nn.o3.spherical_harmonics(range(lmax + 1), x, normalize=True)``; block ``l`` equals
``e3nn.o3.wigner_D(l, *e3nn.o3.matrix_to_angles(R))`` and the degree-1 block is ``R`` itself
(e3nn's l=1 harmonics are proportional to ``(x, y, z)`` in that order).

Method (sampling): for a constant set ``X`` of ``N`` unit vectors, ``Y_l(R X) = D_l(R) Y_l(X)``,
so ``D_l(R) = Y_l(R X) @ pinv(Y_l(X))``. The harmonics at ``R X`` come from the associated
Legendre recurrence in the polar coordinate ``y`` plus the azimuthal recurrence on
``(z + i x)^m``; only the m-rows that are asked for are evaluated (3 per degree for the
``|m| <= 1`` rows SCN uses). Everything is a polynomial in the entries of ``R``, so values and
gradients are finite for every rotation (no Euler angles, no ``acos``/``atan2``). All
constants are computed once in float64 in ``__init__``.

Measured with ``benchmarks/bench_wigner.py --quick`` (2 CPU threads, float32, 5000 rotations,
lmax 6), forward / forward+backward: the |m| <= 1 rows SCN uses take 3.2 / 5.6 ms, against
187 / 966 ms for e3nn's ``matrix_exp`` route and 17.9 / 47.6 ms for the Euler-angle ``Jd``
route of the official SCN code (whose gradients are not finite for edges along the polar axis).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .constants import ConstantsModule

__all__ = ["WignerD", "wigner_D"]


def _norm_const(l: int, m: int) -> float:
    """Scale turning the raw polynomial ``Pi_l^|m|(y) * Re/Im (z + i x)^|m|`` into e3nn's
    'component'-normalised harmonic (up to a per-degree constant, which cancels in D)."""
    am = abs(m)
    k = math.sqrt((2 * l + 1) * math.factorial(l - am) / math.factorial(l + am))
    k *= math.prod(range(2 * am - 1, 0, -2))  # (2|m|-1)!!, from P_l^m = (2m-1)!! rho^m Pi_l^m
    return k * (math.sqrt(2.0) if m != 0 else 1.0)


_MAX_COND = 10.0
_MAX_EXTRA_POINTS = 16


def _fibonacci_sphere(n: int) -> torch.Tensor:
    """[n, 3] float64 quasi-uniform unit vectors (golden-angle spiral, polar axis y)."""
    i = torch.arange(n, dtype=torch.float64) + 0.5
    y = 1.0 - 2.0 * i / n
    rho = torch.sqrt(1.0 - y * y)
    phi = math.pi * (3.0 - math.sqrt(5.0)) * i
    return torch.stack([rho * torch.sin(phi), y, rho * torch.cos(phi)], dim=-1)


class _Harmonics(ConstantsModule):
    """Selected m-rows of the real harmonics at unit vectors, up to a constant scale per (l, m).

    Returns per degree l a tensor Z_l [len(ms[l]), E, N] (rows: ``ms[l]``, the sorted requested
    m values with |m| <= l) with ``Y_l^m = scale[l][i] * Z_l[i]``, where Y is e3nn's harmonic
    in component normalisation. Z is 'monic': Z_|m|^m = Re/Im (z + i x)^|m| and
    Z_l^m = y Z_{l-1}^m - beta_lm Z_{l-2}^m, one fused addcmul per degree; the scales are
    folded into the pseudo-inverses by the caller.
    """

    def __init__(self, lmax: int, mset: Sequence[int]) -> None:
        super().__init__()
        self.lmax = lmax
        mset = sorted(set(int(m) for m in mset))
        self.ms = [[m for m in mset if abs(m) <= l] for l in range(lmax + 1)]
        self.mmax = max((abs(m) for m in mset), default=0)
        # Normalised recurrence Y_l = a y Y_{l-1} - b Y_{l-2} (associated Legendre in y, r = 1).
        a = lambda l, m: (2 * l - 1) / (l - abs(m)) * _norm_const(l, m) / _norm_const(l - 1, m)  # noqa: E731
        b = lambda l, m: (l + abs(m) - 1) / (l - abs(m)) * _norm_const(l, m) / _norm_const(l - 2, m)  # noqa: E731
        self.scale: list[list[float]] = []
        sc: dict[tuple[int, int], float] = {}
        for l in range(lmax + 1):
            for m in range(-l, l + 1):
                sc[l, m] = _norm_const(l, m) if abs(m) == l else a(l, m) * sc[l - 1, m]
            self.scale.append([sc[l, m] for m in self.ms[l]])
        self.pad: list[tuple[int, int]] = [(0, 0), (0, 0)]
        for l in range(2, lmax + 1):
            inner, prev2 = self.ms[l - 1], self.ms[l - 2]
            # beta = b s_{l-2} / s_l; zero on the m = +-(l-1) rows that Z_{l-2} lacks (padded).
            beta = [b(l, m) * sc[l - 2, m] / sc[l, m] if abs(m) <= l - 2 else 0.0 for m in inner]
            self.register_constant(f"beta_{l}", torch.tensor(beta, dtype=torch.float64).view(-1, 1, 1))
            lo, hi = int(-(l - 1) in inner), int(l - 1 in inner)
            self.pad.append((lo, hi) if prev2 else (0, 0))
        self.has_neg = [(-l in mset) and l > 0 for l in range(lmax + 1)]
        self.has_pos = [(l in mset) and l > 0 for l in range(lmax + 1)]
        # rows of (x, y, z) giving Z_1 for m = -1, 0, 1
        self.l1_rows = [m + 1 for m in self.ms[1]] if lmax >= 1 else []

    def forward(self, xyz: torch.Tensor) -> list[torch.Tensor]:
        """xyz [3, E, N] (coordinates of the rotated points) -> list of Z_l [len(ms[l]), E, N]."""
        x, y, z = xyz.unbind(0)
        E, N = x.shape
        # Z_0 = 1 kept as a broadcastable [1, 1, 1] so no [E, N] tensor of ones is materialised.
        out: list[torch.Tensor] = [xyz.new_ones((len(self.ms[0]), 1, 1))]
        if self.lmax == 0:
            return [out[0].expand(len(self.ms[0]), E, N)]
        rows = self.l1_rows
        if rows == [0, 1, 2]:
            out.append(xyz)
        elif rows == list(range(rows[0], rows[-1] + 1)) if rows else False:
            out.append(xyz[rows[0] : rows[-1] + 1])
        else:
            out.append(xyz[rows] if rows else xyz.new_zeros((0, E, N)))
        c, s = z, x  # Re, Im of (z + i x)^l
        for l in range(2, self.lmax + 1):
            if l <= self.mmax:
                c, s = torch.addcmul(z * c, x, s, value=-1.0), torch.addcmul(z * s, x, c)
            parts = []
            if self.has_neg[l]:
                parts.append(s.unsqueeze(0))
            prev, prev2 = out[l - 1], out[l - 2]
            if prev.shape[0] > 0:
                if prev2.shape[0] > 0:
                    lo, hi = self.pad[l]
                    if lo or hi:
                        prev2 = torch.nn.functional.pad(prev2, (0, 0, 0, 0, lo, hi))
                    parts.append(torch.addcmul(y * prev, getattr(self, f"beta_{l}"), prev2, value=-1.0))
                else:
                    parts.append(y * prev)
            if self.has_pos[l]:
                parts.append(c.unsqueeze(0))
            if len(parts) == 1:
                out.append(parts[0])
            elif parts:
                out.append(torch.cat(parts, dim=0))
            else:
                out.append(xyz.new_zeros((0, E, N)))
        out[0] = out[0].expand(len(self.ms[0]), E, N)
        return out


class _PlaceBlocks(torch.autograd.Function):
    """Write blocks [E, r1-r0, c1-c0] into a zero [E, n_rows, n_cols] tensor.

    Slice assignment under autograd would clone the whole (mostly zero) output once per
    block in backward; here backward is just views of the incoming gradient, and since those
    are differentiable ops, double backward (force training) still works.
    """

    @staticmethod
    def forward(ctx, layout, n_rows: int, n_cols: int, *blocks: torch.Tensor) -> torch.Tensor:
        ctx.layout = layout
        out = blocks[0].new_zeros((blocks[0].shape[0], n_rows, n_cols))
        for (r0, r1, c0, c1), b in zip(layout, blocks):
            out[:, r0:r1, c0:c1] = b
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (None, None, None, *(grad[:, r0:r1, c0:c1] for r0, r1, c0, c1 in ctx.layout))


class WignerD(ConstantsModule):
    """Rows of the block-diagonal Wigner-D matrix for degrees 0..lmax (e3nn convention).

    Args:
        lmax: highest degree.
        rows: flat coefficient indices ``l*l + l + m`` of the rows to return (any order,
            repeats allowed); ``None`` for all ``(lmax+1)**2`` rows.
    """

    def __init__(
        self,
        lmax: int,
        rows: Sequence[int] | None = None,
        *,
        n_points: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if lmax < 0:
            raise ValueError(f"lmax must be >= 0, got {lmax}")
        self.lmax = lmax
        dim = (lmax + 1) ** 2
        rows = list(range(dim)) if rows is None else [int(r) for r in rows]
        if not rows:
            raise ValueError("rows must not be empty")
        if any(r < 0 or r >= dim for r in rows):
            raise ValueError(f"rows must lie in [0, {dim}), got {rows}")
        self.rows = rows
        self.dim = dim
        lm = [(int(math.isqrt(r)), r - int(math.isqrt(r)) ** 2 - int(math.isqrt(r))) for r in rows]
        uniq = sorted(set(rows))
        self.ls = sorted(set(l for l, _ in lm))
        mset = sorted(set(m for _, m in lm))
        self.harm = _Harmonics(lmax, mset)

        pts, ys = self._choose_points(lmax, self.ls, n_points)
        self.register_constant("points", pts.T.contiguous())  # [3, N]
        # Per degree: which evaluated harmonic rows to keep, and the matrix taking them to D rows.
        self.has_sel: dict[int, bool] = {}
        layout = []
        pos = 0
        for l in self.ls:
            ms_l = self.harm.ms[l]
            want = [r - l * l - l for r in uniq if l * l <= r < (l + 1) ** 2]
            idx = [ms_l.index(m) for m in want]
            self.has_sel[l] = idx != list(range(len(ms_l)))
            if self.has_sel[l]:
                self.register_buffer(f"sel_{l}", torch.tensor(idx), persistent=False)
            layout.append((pos, pos + len(want), l * l, (l + 1) ** 2))
            pos += len(want)
            # D_l[m, :] = Y_l^m(R X) @ pinv(Y_l(X)) = scale_lm * Z_l^m(R X) @ pinv(Y_l(X))
            pinv = torch.linalg.pinv(ys[l])  # [N, 2l+1]
            scale = torch.tensor([self.harm.scale[l][i] for i in idx], dtype=torch.float64)
            self.register_constant(f"proj_{l}", scale.view(-1, 1, 1) * pinv)  # [k, N, 2l+1]
        self.layout = tuple(layout)
        self.n_uniq = len(uniq)
        perm = [uniq.index(r) for r in rows]
        self.has_perm = perm != list(range(len(uniq)))
        if self.has_perm:
            self.register_buffer("perm", torch.tensor(perm), persistent=False)
        # Float constants keep float64 masters (ConstantsModule): a later .to(float64) is exact.
        self.to(device=device, dtype=dtype or torch.get_default_dtype())

    @staticmethod
    def _choose_points(lmax: int, ls: Sequence[int], n_points: int | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Smallest Fibonacci point set (N >= 2*lmax+1) whose sample matrices Y_l(X) [2l+1, N]
        all have condition number <= _MAX_COND, so float32 rounding is amplified by < ~10.

        Returns points [N, 3] and the float64 harmonics per degree [2l+1, N].
        """
        full = _Harmonics(lmax, range(-lmax, lmax + 1)).double()
        candidates = [n_points] if n_points is not None else range(2 * lmax + 1, 2 * lmax + 1 + _MAX_EXTRA_POINTS)
        best = None
        for n in candidates:
            pts = _fibonacci_sphere(n)
            zs = full(pts.T.unsqueeze(1))  # [2l+1, 1, N] per degree
            ys = [torch.tensor(sc, dtype=torch.float64).view(-1, 1) * z[:, 0] for sc, z in zip(full.scale, zs)]
            cond = max(torch.linalg.cond(ys[l]).item() for l in ls)
            if best is None or cond < best[0]:
                best = (cond, pts, ys)
            if cond <= _MAX_COND:
                break
        return best[1], best[2]

    def forward(self, rotation: torch.Tensor) -> torch.Tensor:
        """rotation [..., 3, 3] -> [..., len(rows), (lmax+1)**2]."""
        batch = rotation.shape[:-2]
        R = rotation.reshape(-1, 3, 3)
        if R.dtype != self.points.dtype:
            raise TypeError(f"rotation is {R.dtype} but WignerD constants are {self.points.dtype}; use .to(dtype)")
        # coordinates of the rotated sample points, [3, E, N] (so each harmonic row is contiguous)
        xyz = torch.matmul(R.transpose(0, 1), self.points)
        zs = self.harm(xyz)
        blocks = []
        for l in self.ls:
            if l == 0:  # D_0 = 1 exactly; skip the (rounded) projection
                blocks.append(xyz.new_ones((xyz.shape[1], 1, 1)))
                continue
            h = zs[l]
            if self.has_sel[l]:
                h = h.index_select(0, getattr(self, f"sel_{l}"))
            # one GEMM per row: [k, E, N] @ [k, N, 2l+1]; the block goes in as an [E, k, 2l+1] view
            blocks.append(torch.matmul(h, getattr(self, f"proj_{l}")).transpose(0, 1))
        out = _PlaceBlocks.apply(self.layout, self.n_uniq, self.dim, *blocks)
        if self.has_perm:
            out = out.index_select(-2, self.perm)
        return out.reshape(*batch, out.shape[-2], self.dim)


_CACHE: dict[tuple[int, torch.device, torch.dtype], WignerD] = {}


def wigner_D(rotation: torch.Tensor, lmax: int) -> torch.Tensor:
    """rotation [..., 3, 3] -> D [..., (lmax+1)**2, (lmax+1)**2], block diagonal over degrees."""
    key = (lmax, rotation.device, rotation.dtype)
    mod = _CACHE.get(key)
    if mod is None:
        mod = WignerD(lmax, dtype=rotation.dtype, device=rotation.device)
        _CACHE[key] = mod
    return mod(rotation)

"""Benchmark Wigner-D construction: spherical_channels' sampling method vs e3nn vs the Jd method.

Usage: python benchmarks/bench_wigner.py [--quick] [--threads 2]

Methods, all producing the same output (block-diagonal D, or its |m| <= 1 rows):
  sampling   spherical_channels.so3.wigner.WignerD (this package)
  e3nn       o3.wigner_D(l, *o3.matrix_to_angles(R)) looped over l (matrix_exp based)
  jd         Euler angles (acos/atan2) then D = Z(a) J Z(b) J Z(c) as in the SCN reference code
  alloc      only allocating + zero-filling the output tensor: the floor every method pays

Prints one JSON object per line (stdout); a summary table goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable

import torch
from e3nn import o3

from spherical_channels.so3.wigner import WignerD, _PlaceBlocks


def m1_rows(lmax: int) -> list[int]:
    """Flat indices l*l + l + m of the rows with |m| <= 1 (what SCN uses)."""
    return [l * l + l + m for l in range(lmax + 1) for m in range(-min(l, 1), min(l, 1) + 1)]


def place(blocks: list[torch.Tensor], lmax: int, rows: list[int] | None) -> torch.Tensor:
    """Assemble full per-degree blocks [E, 2l+1, 2l+1] into the WignerD output layout."""
    dim = (lmax + 1) ** 2
    if rows is None:
        layout = tuple((l * l, (l + 1) ** 2, l * l, (l + 1) ** 2) for l in range(lmax + 1))
        return _PlaceBlocks.apply(layout, dim, dim, *blocks)
    sel, layout, r = [], [], 0
    for l, b in enumerate(blocks):
        ms = [x - l * l for x in rows if l * l <= x < (l + 1) ** 2]  # rows assumed sorted by l
        sel.append(b[:, ms, :])
        layout.append((r, r + len(ms), l * l, (l + 1) ** 2))
        r += len(ms)
    return _PlaceBlocks.apply(tuple(layout), r, dim, *sel)


class E3nnWigner:
    """e3nn >= 0.5 reference: matrix_exp of the generators for every call."""

    def __init__(self, lmax: int, rows: list[int] | None) -> None:
        self.lmax, self.rows = lmax, rows

    def __call__(self, R: torch.Tensor) -> torch.Tensor:
        a, b, c = o3.matrix_to_angles(R)
        return place([o3.wigner_D(l, a, b, c) for l in range(self.lmax + 1)], self.lmax, self.rows)


class JdWigner:
    """The SCN/OCP method: Euler angles from R, then D = Z(a) J Z(b) J Z(c).

    In e3nn's convention D(a, b, c) = Dy(a) Dx(b) Dy(c); Z(t) = Dy(t) is the sparse cos/sin
    matrix of SCN's ``_z_rot_mat`` and J = D(Q) with Q = [[0,1,0],[1,0,0],[0,0,-1]] (the
    rotation by pi about (x+y)/sqrt2, an involution with Q Ry(t) Q = Rx(t)). Note J is *not*
    ``o3.wigner_D(l, 0, pi/2, 0)`` (that is Dx(pi/2)); verified numerically in ``check``.
    """

    def __init__(self, lmax: int, rows: list[int] | None, dtype: torch.dtype) -> None:
        self.lmax, self.rows = lmax, rows
        Q = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]], dtype=torch.float64)
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)  # e3nn builds its generators in the default dtype
        try:
            self.J = [o3.wigner_D(l, *o3.matrix_to_angles(Q)).to(dtype) for l in range(lmax + 1)]
        finally:
            torch.set_default_dtype(prev)

    @staticmethod
    def z_rot(angle: torch.Tensor, l: int) -> torch.Tensor:
        """[E] -> [E, 2l+1, 2l+1], SCN's _z_rot_mat (rotation about e3nn's polar y axis)."""
        M = angle.new_zeros((*angle.shape, 2 * l + 1, 2 * l + 1))
        inds = torch.arange(0, 2 * l + 1, device=angle.device)
        rev = torch.arange(2 * l, -1, -1, device=angle.device)
        freq = torch.arange(l, -l - 1, -1, dtype=angle.dtype, device=angle.device)
        M[..., inds, rev] = torch.sin(freq * angle[..., None])
        M[..., inds, inds] = torch.cos(freq * angle[..., None])
        return M

    def __call__(self, R: torch.Tensor) -> torch.Tensor:
        # SCN's RotationToWignerDMatrix: angles of R (singular when R e_y = +-e_y).
        x = R @ R.new_tensor([0.0, 1.0, 0.0])
        a, b = o3.xyz_to_angles(x)
        R2 = o3.angles_to_matrix(a, b, torch.zeros_like(a)).transpose(-1, -2) @ R
        c = torch.atan2(R2[..., 0, 2], R2[..., 0, 0])
        blocks = []
        for l in range(self.lmax + 1):
            J = self.J[l]
            blocks.append(self.z_rot(a, l) @ J @ self.z_rot(b, l) @ J @ self.z_rot(c, l))
        return place(blocks, self.lmax, self.rows)


def frame_from_edge(v: torch.Tensor) -> torch.Tensor:
    """[E, 3] edge directions -> [E, 3, 3] rotations with R @ v_hat = e_y (the SCN frame rule)."""
    v = torch.nn.functional.normalize(v, dim=-1)
    ref_a = torch.nn.functional.normalize(v.new_tensor([0.3, 0.5, 0.8]), dim=0)
    ref_b = torch.nn.functional.normalize(v.new_tensor([0.5, -0.3, 0.0]), dim=0)
    ref = torch.where(((v @ ref_a).abs() > 0.9)[:, None], ref_b, ref_a)
    z = torch.nn.functional.normalize(torch.cross(v, ref, dim=-1), dim=-1)
    y = torch.nn.functional.normalize(torch.cross(v, z, dim=-1), dim=-1)
    return torch.stack([z, v, -y], dim=-2)


def time_methods(
    methods: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    R: torch.Tensor,
    grad_out: torch.Tensor,
    reps: int,
    budget_s: float,
) -> dict[str, tuple[list[float], list[float]]]:
    """Forward (no_grad) and forward+backward times in ms, methods interleaved per repetition so
    that background load hits them alike. A method whose warm-up took longer than budget_s / reps
    gets fewer repetitions (at least one), to keep e3nn at E = 50000 affordable."""
    Rg = R.clone().requires_grad_()

    def fwd(f):
        with torch.no_grad():
            f(R)

    def fb(f):
        torch.autograd.grad(f(Rg), Rg, grad_out)

    times: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in methods}
    n_reps = {}
    for name, f in methods.items():  # warm-up: lazy init, first-touch of allocator pools
        t0 = time.perf_counter()
        fwd(f)
        if name != "alloc":
            fb(f)
        n_reps[name] = max(1, min(reps, int(budget_s / max(time.perf_counter() - t0, 1e-9))))
    for rep in range(reps):
        for name, f in methods.items():
            if rep >= n_reps[name]:
                continue
            t0 = time.perf_counter()
            fwd(f)
            times[name][0].append((time.perf_counter() - t0) * 1e3)
            if name != "alloc":
                t0 = time.perf_counter()
                fb(f)
                times[name][1].append((time.perf_counter() - t0) * 1e3)
            else:
                times[name][1].append(times[name][0][-1])
    return times


def check(lmax: int, methods: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> dict[str, dict]:
    """Max deviation from the sampling method on random rotations, and gradient finiteness for
    rotations built from edges along +-x, +-y, +-z (float32)."""
    torch.manual_seed(0)
    R = o3.rand_matrix(64)
    ref = methods["sampling"](R)
    edges = torch.tensor([[1.0, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]])
    res = {}
    for name, f in methods.items():
        if name == "alloc":
            continue
        dev = (f(R) - ref).abs().max().item()
        v = edges.clone().requires_grad_()
        out = f(frame_from_edge(v))
        (grad,) = torch.autograd.grad((out * torch.randn(out.shape)).sum(), v)
        res[name] = {"max_dev_vs_sampling": dev, "grad_finite_axis_edges": bool(torch.isfinite(grad).all())}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="E=5000 only, fewer repeats (< 60 s)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = torch.float32
    sizes = [5000] if args.quick else [5000, 50000]
    lmaxes = [6] if args.quick else [4, 6, 8]
    reps = 3 if args.quick else 7
    budget_s = 20.0 if args.quick else 60.0

    summary = []
    for lmax in lmaxes:
        for variant in ("full", "rows_m1"):
            rows = None if variant == "full" else m1_rows(lmax)
            n_rows = (lmax + 1) ** 2 if rows is None else len(rows)
            t0 = time.perf_counter()
            sampling = WignerD(lmax, rows, dtype=dtype)
            init_ms = (time.perf_counter() - t0) * 1e3
            methods: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
                "sampling": sampling,
                "e3nn": E3nnWigner(lmax, rows),
                "jd": JdWigner(lmax, rows, dtype),
                "alloc": lambda R, n=n_rows, d=(lmax + 1) ** 2: R.new_zeros(R.shape[0], n, d),
            }
            checks = check(lmax, methods)
            for E in sizes:
                R = o3.rand_matrix(E).to(dtype)
                grad_out = torch.randn(E, n_rows, (lmax + 1) ** 2, dtype=dtype)
                times = time_methods(methods, R, grad_out, reps, budget_s)
                res = {}
                for name, (fwd, fb) in times.items():
                    res[name] = {
                        "method": name,
                        "variant": variant,
                        "lmax": lmax,
                        "E": E,
                        "dtype": str(dtype).replace("torch.", ""),
                        "threads": args.threads,
                        "reps": len(fwd),
                        "fwd_ms_min": round(min(fwd), 2),
                        "fwd_ms_median": round(statistics.median(fwd), 2),
                        "fwdbwd_ms_min": round(min(fb), 2),
                        "fwdbwd_ms_median": round(statistics.median(fb), 2),
                        **checks.get(name, {}),
                    }
                s = res["sampling"]
                s["init_ms"] = round(init_ms, 2)
                s["n_points"] = sampling.points.shape[1]
                for base in ("e3nn", "jd"):
                    s[f"fwd_speedup_vs_{base}"] = round(res[base]["fwd_ms_min"] / s["fwd_ms_min"], 2)
                    s[f"fwdbwd_speedup_vs_{base}"] = round(res[base]["fwdbwd_ms_min"] / s["fwdbwd_ms_min"], 2)
                for rec in res.values():
                    print(json.dumps(rec), flush=True)
                summary.append(res)

    print(f"\n{'variant':8} {'lmax':>4} {'E':>6} | {'fwd ms: sampling / e3nn / jd / alloc':>40} | "
          f"{'fwd+bwd ms: sampling / e3nn / jd':>36} | speedup fwd, fwd+bwd vs e3nn; vs jd", file=sys.stderr)
    for res in summary:
        s, e, j, a = res["sampling"], res["e3nn"], res["jd"], res["alloc"]
        print(
            f"{s['variant']:8} {s['lmax']:>4} {s['E']:>6} | "
            f"{s['fwd_ms_min']:>9.1f} {e['fwd_ms_min']:>9.1f} {j['fwd_ms_min']:>9.1f} {a['fwd_ms_min']:>9.1f} | "
            f"{s['fwdbwd_ms_min']:>10.1f} {e['fwdbwd_ms_min']:>10.1f} {j['fwdbwd_ms_min']:>10.1f} | "
            f"{s['fwd_speedup_vs_e3nn']:>5.1f}x {s['fwdbwd_speedup_vs_e3nn']:>5.1f}x; "
            f"{s['fwd_speedup_vs_jd']:>5.1f}x {s['fwdbwd_speedup_vs_jd']:>5.1f}x",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()

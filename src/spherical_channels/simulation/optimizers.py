"""Batched FIRE and LBFGS in torch: ASE's algorithms, vectorised over many structures.

The optimisers work on *rows*: generalised coordinates ``x`` ``[R, 3]`` and forces ``[R, 3]``
of S structures, the rows of each structure contiguous and in structure order (``seg`` ``[R]``,
the structure of each row, is non-decreasing). For a plain relaxation the rows are the atoms;
with a cell filter they are a structure's atoms followed by its three cell rows. Every
per-structure quantity of ASE's optimisers (FIRE's time step and mixing, LBFGS's history) is a
tensor over the S structures, and the reductions ASE takes over one structure's vector (dot
products, norms, the largest row norm) are segment sums and maxima. No Python loop runs over
structures, nor over LBFGS's history (its two-loop recursion is solved in closed form).

The state lives in float64 whatever precision the model runs in, and is packed so that
structures can leave (:meth:`PackedState.select`) and join (:meth:`PackedState.concatenate`)
between steps: in-flight batching.

One structure relaxed here follows ``ase.optimize.FIRE`` / ``ase.optimize.LBFGS`` step by step
(to rounding: sums are taken in another order). What ASE offers beyond that is refused rather
than half-done: FIRE's ``downhill_check`` and LBFGS's line search need energies and position
resets.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import ClassVar, Sequence, TypeVar

import torch

__all__ = [
    "FIRE",
    "FIREState",
    "LBFGS",
    "LBFGSState",
    "OPTIMIZER_CLASSES",
    "PackedState",
    "BatchedOptimizer",
    "make_optimizer",
    "STATE_DTYPE",
    "row_norms",
    "row_segments",
    "segment_max",
    "segment_sum",
]

#: The precision of every optimiser state, whatever the model's.
STATE_DTYPE = torch.float64

T = TypeVar("T", bound="PackedState")


# ---------------------------------------------------------------------------- segment helpers
def row_segments(counts: torch.Tensor) -> torch.Tensor:
    """Structure index of each row ``[R]`` for ``counts`` ``[S]`` rows per structure."""
    return torch.repeat_interleave(torch.arange(counts.shape[0], device=counts.device), counts)


def segment_sum(values: torch.Tensor, seg: torch.Tensor, num: int) -> torch.Tensor:
    """Per-structure sums ``[S]`` of per-row ``values`` ``[R]`` (or ``[R, 3]``, summed over both)."""
    if values.dim() == 2:
        values = values.sum(dim=1)
    return values.new_zeros(num).index_add_(0, seg, values)


def segment_max(values: torch.Tensor, seg: torch.Tensor, num: int) -> torch.Tensor:
    """Per-structure maxima ``[S]`` of non-negative per-row ``values`` ``[R]`` (0 for no rows)."""
    return values.new_zeros(num).scatter_reduce_(0, seg, values, reduce="amax", include_self=True)


def row_norms(vectors: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of each row ``[R]`` of ``vectors`` ``[R, 3]``."""
    return torch.linalg.vector_norm(vectors, dim=1)


# ---------------------------------------------------------------------------- packed state
@dataclass
class PackedState:
    """Optimiser state of S structures, packed: per-row tensors (``ROW_DIMS`` names them and
    the dimension that runs over rows) and per-structure tensors (``STRUCT_DIMS``).

    Attributes:
        counts: [S] long, rows per structure.
        seg: [R] long, structure of each row (non-decreasing).
    """

    counts: torch.Tensor
    seg: torch.Tensor

    ROW_DIMS: ClassVar[dict[str, int]] = {}
    STRUCT_DIMS: ClassVar[dict[str, int]] = {}

    @property
    def num_structures(self) -> int:
        """S."""
        return int(self.counts.shape[0])

    @property
    def num_rows(self) -> int:
        """R."""
        return int(self.seg.shape[0])

    def select(self: T, keep: torch.Tensor) -> T:
        """The state of the structures where ``keep`` ``[S]`` (bool) is True, in order."""
        keep = keep.to(device=self.counts.device, dtype=torch.bool)
        rows = keep[self.seg]
        changes: dict[str, torch.Tensor] = {}
        for name, dim in self.ROW_DIMS.items():
            changes[name] = getattr(self, name)[(slice(None),) * dim + (rows,)]
        for name, dim in self.STRUCT_DIMS.items():
            changes[name] = getattr(self, name)[(slice(None),) * dim + (keep,)]
        counts = self.counts[keep]
        return replace(self, counts=counts, seg=row_segments(counts), **changes)

    @classmethod
    def concatenate(cls: type[T], states: Sequence[T]) -> T:
        """One state of all structures of ``states``, in order (same class and settings)."""
        states = list(states)
        if not states:
            raise ValueError(f"{cls.__name__}.concatenate: no states")
        if len(states) == 1:
            return states[0]
        first = states[0]
        for other in states[1:]:
            for f in fields(cls):
                if f.name in ("counts", "seg") or f.name in cls.ROW_DIMS or f.name in cls.STRUCT_DIMS:
                    continue
                if getattr(other, f.name) != getattr(first, f.name):
                    raise ValueError(f"{cls.__name__}.concatenate: states differ in {f.name}")
        counts = torch.cat([s.counts for s in states])
        changes = {name: torch.cat([getattr(s, name) for s in states], dim=dim) for name, dim in cls.ROW_DIMS.items()}
        changes.update(
            {name: torch.cat([getattr(s, name) for s in states], dim=dim) for name, dim in cls.STRUCT_DIMS.items()}
        )
        return replace(first, counts=counts, seg=row_segments(counts), **changes)


class BatchedOptimizer:
    """What the relaxation engine needs of an optimiser: a fresh state for new structures and
    one step for all structures of a state."""

    #: ASE's name of the algorithm.
    name: ClassVar[str] = ""

    def init_state(self, counts: torch.Tensor) -> PackedState:
        """Fresh state for structures of ``counts`` ``[S]`` rows (on ``counts``' device)."""
        raise NotImplementedError

    def step(self, state: PackedState, x: torch.Tensor, forces: torch.Tensor) -> torch.Tensor:
        """The displacement ``[R, 3]`` (float64) of every row from positions ``x`` ``[R, 3]``
        and forces ``forces`` ``[R, 3]`` (constrained: zero on fixed rows); updates ``state``
        in place, as one call of ASE's ``step()`` does for each structure."""
        raise NotImplementedError

    def options(self) -> dict[str, float | int | bool]:
        """The parameters, by ASE's names."""
        raise NotImplementedError


# ---------------------------------------------------------------------------- FIRE
@dataclass
class FIREState(PackedState):
    """FIRE's state per structure (ASE's attribute in brackets).

    Attributes:
        velocity: [R, 3] (``vel``). dt: [S] time step (``dt``). a: [S] mixing (``a``).
        n_positive: [S] long, steps since the last uphill step (``Nsteps``).
        started: [S] bool, a first step was taken (ASE: ``vel is not None``).
    """

    velocity: torch.Tensor = None  # type: ignore[assignment]
    dt: torch.Tensor = None  # type: ignore[assignment]
    a: torch.Tensor = None  # type: ignore[assignment]
    n_positive: torch.Tensor = None  # type: ignore[assignment]
    started: torch.Tensor = None  # type: ignore[assignment]

    ROW_DIMS: ClassVar[dict[str, int]] = {"velocity": 0}
    STRUCT_DIMS: ClassVar[dict[str, int]] = {"dt": 0, "a": 0, "n_positive": 0, "started": 0}


class FIRE(BatchedOptimizer):
    """``ase.optimize.FIRE`` for many structures at once, with ASE's parameters and defaults.

    ``maxstep`` caps the norm of a structure's whole step vector (all its rows together), as
    ASE's FIRE does. ``downhill_check=True`` is not supported (it needs energies and position
    resets); ASE's deprecated ``maxmove`` is not accepted.
    """

    name = "FIRE"

    def __init__(
        self,
        dt: float = 0.1,
        maxstep: float = 0.2,
        dtmax: float = 1.0,
        Nmin: int = 5,  # noqa: N803 (ASE's name)
        finc: float = 1.1,
        fdec: float = 0.5,
        astart: float = 0.1,
        fa: float = 0.99,
        a: float = 0.1,
        downhill_check: bool = False,
    ) -> None:
        if downhill_check:
            raise ValueError("FIRE: downhill_check=True is not supported by the batched optimiser")
        for key, value in dict(dt=dt, maxstep=maxstep, dtmax=dtmax, finc=finc, fdec=fdec).items():
            if not (isinstance(value, (int, float)) and value > 0 and value < float("inf")):
                raise ValueError(f"FIRE: {key} must be a finite positive number, got {value!r}")
        for key, value in dict(astart=astart, fa=fa, a=a).items():
            if not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise ValueError(f"FIRE: {key} must lie in [0, 1], got {value!r}")
        if isinstance(Nmin, bool) or not isinstance(Nmin, int) or Nmin < 0:
            raise ValueError(f"FIRE: Nmin must be a non-negative integer, got {Nmin!r}")
        self.dt, self.maxstep, self.dtmax, self.Nmin = float(dt), float(maxstep), float(dtmax), int(Nmin)
        self.finc, self.fdec, self.astart, self.fa, self.a = float(finc), float(fdec), float(astart), float(fa), float(a)

    def options(self) -> dict[str, float | int | bool]:
        return dict(dt=self.dt, maxstep=self.maxstep, dtmax=self.dtmax, Nmin=self.Nmin, finc=self.finc,
                    fdec=self.fdec, astart=self.astart, fa=self.fa, a=self.a, downhill_check=False)

    def init_state(self, counts: torch.Tensor) -> FIREState:
        device, s = counts.device, int(counts.shape[0])
        seg = row_segments(counts)
        return FIREState(
            counts=counts,
            seg=seg,
            velocity=torch.zeros(seg.shape[0], 3, dtype=STATE_DTYPE, device=device),
            dt=torch.full((s,), self.dt, dtype=STATE_DTYPE, device=device),
            a=torch.full((s,), self.a, dtype=STATE_DTYPE, device=device),
            n_positive=torch.zeros(s, dtype=torch.long, device=device),
            started=torch.zeros(s, dtype=torch.bool, device=device),
        )

    def step(self, state: FIREState, x: torch.Tensor, forces: torch.Tensor) -> torch.Tensor:  # noqa: ARG002
        seg, s = state.seg, state.num_structures
        f = forces.to(STATE_DTYPE)
        v = state.velocity
        vf = segment_sum(f * v, seg, s)
        grad2 = segment_sum(f * f, seg, s)
        vv = segment_sum(v * v, seg, s)
        downhill = state.started & (vf > 0.0)
        uphill = state.started & ~(vf > 0.0)
        # ASE: vel = (1 - a) vel + a F / |F| |vel| when moving downhill (|F| > 0 there)
        scale = torch.where(downhill, state.a * torch.sqrt(vv) / torch.where(downhill, torch.sqrt(grad2), 1.0), 0.0)
        keep = torch.where(downhill, 1.0 - state.a, torch.where(uphill, 0.0, 1.0))
        v = keep[seg, None] * v + scale[seg, None] * f
        grow = downhill & (state.n_positive > self.Nmin)
        dt = torch.where(grow, torch.clamp(state.dt * self.finc, max=self.dtmax), state.dt)
        a = torch.where(grow, state.a * self.fa, state.a)
        state.dt = torch.where(uphill, state.dt * self.fdec, dt)
        state.a = torch.where(uphill, torch.full_like(a, self.astart), a)
        state.n_positive = torch.where(uphill, 0, torch.where(downhill, state.n_positive + 1, state.n_positive))
        step_dt = state.dt[seg, None]
        v = v + step_dt * f
        dr = step_dt * v
        norm = torch.sqrt(segment_sum(dr * dr, seg, s))
        too_long = norm > self.maxstep
        dr = dr * torch.where(too_long, self.maxstep / torch.where(too_long, norm, 1.0), 1.0)[seg, None]
        state.velocity = v
        state.started = torch.ones_like(state.started)
        return dr


# ---------------------------------------------------------------------------- LBFGS
@dataclass
class LBFGSState(PackedState):
    """LBFGS's state per structure (ASE's attribute in brackets).

    The history is ordered by age: entry 0 is the newest. A structure's first
    ``min(iteration, memory)`` entries are its history (ASE's ``s``, ``y``, ``rho`` lists, last
    first); every other entry is zero (a structure's first step pushes a zero entry, fresh
    states are zero), so padded entries drop out of every sum without masks.

    Attributes:
        s_hist, y_hist: [C, R, 3] position and gradient differences (``s``, ``y``).
        rho: [C, S] ``1 / (y . s)`` (``rho``).
        sy: [S, C, C] ``s_i . y_j`` and yy: [S, C, C] ``y_i . y_j`` per structure (kept up to
            date entry by entry, so that a step needs no loop over the history).
        iteration: [S] long, steps taken (``iteration``).
        r0, f0: [R, 3] positions and forces of the previous step (``r0``, ``f0``).
        capacity: C, history entries kept (``min(memory, history_limit)``).
    """

    s_hist: torch.Tensor = None  # type: ignore[assignment]
    y_hist: torch.Tensor = None  # type: ignore[assignment]
    rho: torch.Tensor = None  # type: ignore[assignment]
    sy: torch.Tensor = None  # type: ignore[assignment]
    yy: torch.Tensor = None  # type: ignore[assignment]
    iteration: torch.Tensor = None  # type: ignore[assignment]
    r0: torch.Tensor = None  # type: ignore[assignment]
    f0: torch.Tensor = None  # type: ignore[assignment]
    capacity: int = 0

    ROW_DIMS: ClassVar[dict[str, int]] = {"s_hist": 1, "y_hist": 1, "r0": 0, "f0": 0}
    STRUCT_DIMS: ClassVar[dict[str, int]] = {"rho": 1, "sy": 0, "yy": 0, "iteration": 0}


def _push(history: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``history`` with ``new`` as entry 0 and the oldest entry dropped."""
    return torch.cat([new.unsqueeze(0), history[:-1]])


def _push_gram(gram: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """Gram matrices ``[S, C, C]`` after a push: old entries move one down and right, the new
    row 0 is ``row`` ``[S, C]`` and column 0 ``col`` ``[S, C]`` (both already over the new
    history)."""
    out = torch.zeros_like(gram)
    out[:, 1:, 1:] = gram[:, :-1, :-1]
    out[:, 0, :] = row
    out[:, :, 0] = col
    return out


class LBFGS(BatchedOptimizer):
    """``ase.optimize.LBFGS`` (without line search) for many structures at once, with ASE's
    parameters and defaults: ``maxstep`` (largest displacement of any row: the step is scaled
    so that its longest row is at most ``maxstep``), ``memory``, ``damping`` and ``alpha`` (the
    initial Hessian is ``alpha * I``, never changed). ASE's history rules hold: the first step
    adds no history entry, every later one adds ``(x - x0, g - g0)``, the oldest beyond
    ``memory`` is dropped.

    ASE's two-loop recursion is evaluated in closed form: its coefficients solve two
    triangular systems made of the history's dot products ``s_i . y_j`` and ``y_i . y_j``,
    which the state keeps. A step is then a fixed number of batched operations however long the
    history (the same numbers as the loops, to rounding).

    Args:
        history_limit: keep at most this many history entries (a caller that takes at most
            this many steps per structure sets it to save memory: a structure never has more
            entries than steps). None: ``memory``.
    """

    name = "LBFGS"

    def __init__(
        self,
        maxstep: float = 0.2,
        memory: int = 100,
        damping: float = 1.0,
        alpha: float = 70.0,
        history_limit: int | None = None,
    ) -> None:
        if not (isinstance(maxstep, (int, float)) and 0 < maxstep < float("inf")):
            raise ValueError(f"LBFGS: maxstep must be a finite positive number, got {maxstep!r}")
        if maxstep > 1.0:  # ASE's own limit
            raise ValueError(f"LBFGS: you are using a much too large value for the maximum step size: {maxstep:.1f} Angstrom")
        if isinstance(memory, bool) or not isinstance(memory, int) or memory < 1:
            raise ValueError(f"LBFGS: memory must be a positive integer, got {memory!r}")
        for key, value in dict(damping=damping, alpha=alpha).items():
            if not (isinstance(value, (int, float)) and 0 < value < float("inf")):
                raise ValueError(f"LBFGS: {key} must be a finite positive number, got {value!r}")
        if history_limit is not None and (not isinstance(history_limit, int) or history_limit < 0):
            raise ValueError(f"LBFGS: history_limit must be a non-negative integer or None, got {history_limit!r}")
        self.maxstep, self.memory, self.damping, self.alpha = float(maxstep), int(memory), float(damping), float(alpha)
        self.capacity = self.memory if history_limit is None else max(1, min(self.memory, history_limit))

    def options(self) -> dict[str, float | int | bool]:
        return dict(maxstep=self.maxstep, memory=self.memory, damping=self.damping, alpha=self.alpha)

    def init_state(self, counts: torch.Tensor) -> LBFGSState:
        device, s = counts.device, int(counts.shape[0])
        seg = row_segments(counts)
        r, c = int(seg.shape[0]), self.capacity
        zeros = dict(dtype=STATE_DTYPE, device=device)
        return LBFGSState(
            counts=counts,
            seg=seg,
            s_hist=torch.zeros(c, r, 3, **zeros),
            y_hist=torch.zeros(c, r, 3, **zeros),
            rho=torch.zeros(c, s, **zeros),
            sy=torch.zeros(s, c, c, **zeros),
            yy=torch.zeros(s, c, c, **zeros),
            iteration=torch.zeros(s, dtype=torch.long, device=device),
            r0=torch.zeros(r, 3, **zeros),
            f0=torch.zeros(r, 3, **zeros),
            capacity=c,
        )

    def step(self, state: LBFGSState, x: torch.Tensor, forces: torch.Tensor) -> torch.Tensor:
        seg, s = state.seg, state.num_structures
        x = x.to(STATE_DTYPE)
        f = forces.to(STATE_DTYPE)
        g = -f

        def dots(history: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
            """``[S, C']``: entry j is ``history[j] . vector`` per structure."""
            per_row = (history * vector).sum(dim=-1)  # [C', R]
            return per_row.new_zeros(per_row.shape[0], s).index_add_(1, seg, per_row).T

        # ASE's update(): past its first step a structure adds (x - x0, g - g0, 1 / y.s); on
        # its first step it adds a zero entry, which drops out of every sum below
        updating = state.iteration > 0
        row_updating = updating[seg, None]
        s_new = torch.where(row_updating, x - state.r0, 0.0)
        y_new = torch.where(row_updating, state.f0 - f, 0.0)
        ys = segment_sum(y_new * s_new, seg, s)
        rho_new = torch.where(updating, 1.0 / torch.where(updating, ys, 1.0), 0.0)
        state.s_hist = _push(state.s_hist, s_new)
        state.y_hist = _push(state.y_hist, y_new)
        state.rho = _push(state.rho, rho_new)
        state.sy = _push_gram(state.sy, dots(state.y_hist, s_new), dots(state.s_hist, y_new))
        y_dots = dots(state.y_hist, y_new)
        state.yy = _push_gram(state.yy, y_dots, y_dots)

        # ASE's compute_step over the longest history in the batch (shorter ones are padded
        # with zero entries). Its first loop, newest entry first, is
        #   a_i = rho_i s_i . (g - sum_{j newer} a_j y_j),
        # the second, oldest first, with z0 = H0 (g - sum_j a_j y_j) and c_j = a_j - b_j,
        #   b_i = rho_i y_i . (z0 + sum_{j older} c_j s_j),   z = z0 + sum_j c_j s_j.
        depth = int(torch.clamp(state.iteration, max=min(self.memory, state.capacity)).max()) if s else 0
        gamma = 1.0 / self.alpha  # ASE's H0 = I / alpha
        if depth == 0:
            z = g * gamma
        else:
            s_h, y_h = state.s_hist[:depth], state.y_hist[:depth]
            rho = state.rho[:depth].T  # [S, D]
            sy = state.sy[:, :depth, :depth]
            yy = state.yy[:, :depth, :depth]
            eye = torch.eye(depth, dtype=STATE_DTYPE, device=x.device)
            first = eye + rho[:, :, None] * torch.tril(sy, -1)
            a = torch.linalg.solve_triangular(first, (rho * dots(s_h, g))[:, :, None], upper=False, unitriangular=True)
            a = a.squeeze(-1)
            y_z0 = gamma * (dots(y_h, g) - (yy @ a[:, :, None]).squeeze(-1))
            second = eye + rho[:, :, None] * torch.triu(sy.transpose(1, 2), 1)
            c = torch.linalg.solve_triangular(second, (a - rho * y_z0)[:, :, None], upper=True, unitriangular=True)
            c = c.squeeze(-1)
            a_rows, c_rows = a.T[:, seg, None], c.T[:, seg, None]  # [D, R, 1]
            z = gamma * (g - (a_rows * y_h).sum(dim=0)) + (c_rows * s_h).sum(dim=0)
        p = -z
        # ASE's determine_step: scale so that the longest row moves at most maxstep
        longest = segment_max(row_norms(p), seg, s)
        too_long = longest >= self.maxstep
        scale = torch.where(too_long, self.maxstep / torch.where(too_long, longest, 1.0), 1.0)
        dr = p * scale[seg, None] * self.damping
        state.r0 = x.clone()
        state.f0 = f.clone()
        state.iteration = state.iteration + 1
        return dr


OPTIMIZER_CLASSES: dict[str, type[BatchedOptimizer]] = {"FIRE": FIRE, "LBFGS": LBFGS}


def make_optimizer(name: str, options: dict | None = None, *, history_limit: int | None = None) -> BatchedOptimizer:
    """The batched optimiser ``name`` (one of :data:`OPTIMIZER_CLASSES`, any case) with ASE's
    parameters ``options``; ``history_limit`` bounds LBFGS's stored history (see :class:`LBFGS`).
    Raises ValueError for an unknown name or option."""
    if not isinstance(name, str) or name.upper() not in OPTIMIZER_CLASSES:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {sorted(OPTIMIZER_CLASSES)}")
    cls = OPTIMIZER_CLASSES[name.upper()]
    options = dict(options or {})
    if "history_limit" in options:
        raise ValueError("history_limit is set by the engine, not an optimizer option")
    if cls is LBFGS:
        options["history_limit"] = history_limit
    try:
        return cls(**options)
    except TypeError as err:
        raise ValueError(f"{cls.name}: bad optimizer options {sorted(options)}: {err}") from None

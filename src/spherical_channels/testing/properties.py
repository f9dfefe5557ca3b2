"""The properties of the suite: each a function ``(model, structures, context) -> [PropertyResult]``.

A *model* is any callable ``model(batch: AtomicBatch) -> {"energy": [S], "forces": [N, 3]}``
(``"forces"`` optional), usually a ``torch.nn.Module``; a model whose attribute ``conservative``
is true promises ``forces = -dE/dx`` and may return ``"stress"`` ``[S, 3, 3]`` from
``model(batch, stress=True)``. Nothing else of the model is used, so any architecture plugs in.

Errors are relative, in the infinity norm over a group of structures: for energies
``max_s |E'_s - E_s| / max_s |E_s|``, for forces ``max |F' - F| / max |F|`` (every atom and
component), for stress the same over the 3x3 entries; a property's ``value`` is the larger of its
energy and force errors (both are in ``details``). Rotation is measured as in the paper's
Appendix A: mean absolute differences over random rotations divided by the mean magnitude.

Each result's tolerance comes from the caller's :class:`Expectations`: ``"exact"`` means the
maths says the property holds exactly, so the tolerance is the rounding tolerance of the dtype
(:class:`Tolerances`); a float is a measured bound for a property the model satisfies only
approximately; ``None`` reports the value without judging it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Union

import numpy as np
import torch
from ase import Atoms

from ..data.batch import AtomicBatch
from ..diagnostics.equivariance import NonFiniteOutput, rotation_mad
from .structures import Structure

__all__ = [
    "Bound",
    "Expectations",
    "FINITE_DIFFERENCE_PROPERTIES",
    "PROPERTIES",
    "PropertyContext",
    "PropertyResult",
    "Tolerances",
    "evaluate",
]

#: ``"exact"``, a relative bound, or ``None`` (report only).
Bound = Union[str, float, None]

#: Result names compared against finite differences (their ``"exact"`` is the FD tolerance).
FINITE_DIFFERENCE_PROPERTIES = frozenset({"forces_gradient", "stress"})

#: Results reported without a bound unless the caller gives one.
REPORT_ONLY = frozenset({"smoothness"})


@dataclass(frozen=True)
class Tolerances:
    """Tolerances of the exact properties, by dtype, and of the finite-difference checks.

    Attributes:
        float64, float32: relative tolerance of an exact property. What sets it is the
            rounding of the positions: a coordinate x carries an error of eps |x| (eps = 1.1e-16
            in float64, 6e-8 in float32), which moves a force by about that times the force's
            curvature. Unwrapped positions two cells out (|x| ~ 40 Å) measured up to 3e-5
            relative in float32 on conservative SCN forces and 8e-14 in float64 (~300 eps
            each); energies are ~100x closer. float32 allows 3x that, float64 1000x.
        finite_difference: relative tolerance of forces and stress against central
            differences (float64 only). A central difference errs by h^2 f^(3) / 6
            (truncation) plus about eps |E| / h (rounding). With the steps below, on the
            full-size demo SCN made conservative (random weights amplified as the official
            fixtures': a strongly curved energy) the forces err by 3e-8 and the stress by 8e-8
            relative; at h = 1e-4 Å the forces' truncation alone reached 2.7e-6. Rounding stays
            below 1e-8 relative for |E| < 1e4 eV and forces ~1 eV/Å.
        position_step: Å, the displacement of a central difference of the forces.
        strain_step: the strain of a central difference of the stress (it moves an atom
            10 Å from the origin by 1.5e-5 Å). The truncation error goes as h^2: at 1e-5 it
            reached 1.7e-6 relative on the shrunk demo variants at a 5 Å cutoff; the smooth
            variant at 4.5 Å (``scn_relax``) gave 5.5e-6, 1.4e-6 and 3.4e-7 at 6e-6, 3e-6 and
            1.5e-6 (round-off at 1.5e-6 is ~1e-9).
    """

    float64: float = 1e-10
    float32: float = 1e-4
    finite_difference: float = 1e-6
    position_step: float = 1e-5
    strain_step: float = 1.5e-6

    def exact(self, dtype: torch.dtype) -> float:
        """Relative tolerance of an exact property in ``dtype``."""
        if dtype == torch.float64:
            return self.float64
        if dtype == torch.float32:
            return self.float32
        raise ValueError(f"no tolerance for dtype {dtype}; the suite runs in float32 and float64")


@dataclass(frozen=True)
class Expectations:
    """What a model is expected to satisfy, per result name.

    Every result is ``"exact"`` unless set here (``smoothness`` is report-only). The fields name
    the results that models commonly satisfy only approximately; ``overrides`` sets any other
    result by name (``{"isolated_atoms": 1e-3}``).

    Attributes:
        rotation_energy, rotation_forces: relative MAD under random rotations (paper Appendix A).
        permutation_symmetric, supercell_symmetric: permutation and 2x2x1-supercell errors on
            symmetric crystals, where a neighbour cap that breaks distance ties by atom order
            breaks both.
        overrides: further result names and their bounds.
    """

    rotation_energy: Bound = "exact"
    rotation_forces: Bound = "exact"
    permutation_symmetric: Bound = "exact"
    supercell_symmetric: Bound = "exact"
    overrides: Mapping[str, Bound] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, bound in self.items():
            _check_bound(name, bound)

    _NAMED = ("rotation_energy", "rotation_forces", "permutation_symmetric", "supercell_symmetric")

    def items(self) -> list[tuple[str, Bound]]:
        """Every explicitly set (name, bound) pair."""
        return [(name, getattr(self, name)) for name in self._NAMED] + list(self.overrides.items())

    def bound(self, name: str) -> Bound:
        """The bound of result ``name``."""
        if name in self.overrides:
            return self.overrides[name]
        if name in self._NAMED:
            return getattr(self, name)
        return None if name in REPORT_ONLY else "exact"


def _check_bound(name: str, bound: Bound) -> None:
    if bound is None or bound == "exact":
        return
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not (bound >= 0 and math.isfinite(bound)):
        raise ValueError(f"expectation {name!r} must be 'exact', None or a finite bound >= 0, got {bound!r}")


@dataclass
class PropertyResult:
    """One measured property.

    Attributes:
        name: the result's name (``"translation"``, ``"rotation_energy"``, ...).
        dtype: ``"float32"`` or ``"float64"``.
        value: the measured relative error (``None`` when not applicable).
        tolerance: the bound it is held to (``None``: report only, or not applicable).
        status: ``"pass"``, ``"fail"``, ``"report"`` (no bound), ``"n/a"`` (not applicable to
            this model, structures or dtype; ``details["reason"]`` says why) or ``"error"``
            (the property raised; ``details["error"]``).
        details: per-quantity and per-structure numbers.
    """

    name: str
    dtype: str
    value: float | None
    tolerance: float | None
    status: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """False only for ``"fail"`` and ``"error"``."""
        return self.status not in ("fail", "error")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "value": self.value,
            "tolerance": self.tolerance,
            "status": self.status,
            "passed": self.passed,
            "details": _plain(self.details),
        }


def _plain(value: Any) -> Any:
    """JSON-friendly copy (floats, lists, dicts)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass
class PropertyContext:
    """Settings shared by the properties of one run in one dtype.

    Attributes:
        dtype: the model's and the batches' float dtype.
        tolerances, expectations: see :class:`Tolerances`, :class:`Expectations`.
        seed: seeds every random choice (rotations, permutations, shifts).
        num_rotations: random rotations of the rotation property.
        fd_atoms: atoms per structure whose forces are checked by finite differences.
        smoothness_steps, smoothness_length: the smoothness path (steps over Å).
        chunk: structures per model call when many copies of one structure are evaluated.
    """

    dtype: torch.dtype
    tolerances: Tolerances = field(default_factory=Tolerances)
    expectations: Expectations = field(default_factory=Expectations)
    seed: int = 0
    num_rotations: int = 4
    fd_atoms: int = 3
    smoothness_steps: int = 400
    smoothness_length: float = 1.0
    chunk: int = 64
    _alone: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def tolerance(self, name: str) -> float | None:
        bound = self.expectations.bound(name)
        if bound == "exact":
            if name in FINITE_DIFFERENCE_PROPERTIES:
                return self.tolerances.finite_difference
            return self.tolerances.exact(self.dtype)
        return None if bound is None else float(bound)

    def result(self, name: str, value: float, details: dict[str, Any] | None = None) -> PropertyResult:
        """A judged result: pass if ``value <= tolerance`` (NaN fails)."""
        tolerance = self.tolerance(name)
        if tolerance is None:
            status = "report"
        else:
            status = "pass" if value <= tolerance else "fail"  # NaN compares False: fails
        return PropertyResult(name, dtype_name(self.dtype), float(value), tolerance, status, details or {})

    def not_applicable(self, name: str, reason: str) -> PropertyResult:
        return PropertyResult(name, dtype_name(self.dtype), None, None, "n/a", {"reason": reason})

    def batch(self, atoms: Sequence[Atoms]) -> AtomicBatch:
        return AtomicBatch.from_atoms(list(atoms), dtype=self.dtype)

    def alone(self, model: Callable, structure: Structure) -> dict[str, torch.Tensor]:
        """The model's outputs on ``structure`` by itself (cached: the reference of most
        properties)."""
        key = id(structure)
        if key not in self._alone:
            self._alone[key] = evaluate(model, self.batch([structure.atoms]))
        return self._alone[key]

    def rng(self, salt: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, salt])


PropertyFunction = Callable[[Callable, Sequence[Structure], PropertyContext], list[PropertyResult]]


# ---------------------------------------------------------------------- evaluation helpers
def evaluate(model: Callable, batch: AtomicBatch, stress: bool = False) -> dict[str, torch.Tensor]:
    """``model(batch)`` (``stress=True``: ``model(batch, stress=True)``), detached, with the
    output checked: ``"energy"`` ``[S]``, optional ``"forces"`` ``[N, 3]`` and ``"stress"``
    ``[S, 3, 3]``."""
    out = model(batch, stress=True) if stress else model(batch)
    if not isinstance(out, Mapping) or "energy" not in out:
        raise TypeError(f"the model must return a mapping with 'energy', got {type(out).__name__}")
    shapes = {"energy": (batch.num_structures,), "forces": (batch.num_atoms, 3), "stress": (batch.num_structures, 3, 3)}
    checked = {}
    for key, shape in shapes.items():
        if key in out:
            value = out[key]
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"model output {key!r} has shape {got}, expected {shape}")
            checked[key] = value.detach()
    return checked


def evaluate_many(model: Callable, base: AtomicBatch, positions: torch.Tensor, cells: torch.Tensor | None, chunk: int) -> torch.Tensor:
    """Energies ``[K]`` of K copies of the single structure ``base`` at ``positions``
    ``[K, n, 3]`` (and ``cells`` ``[K, 3, 3]``), ``chunk`` copies per model call."""
    energies = []
    for lo in range(0, positions.shape[0], chunk):
        hi = min(lo + chunk, positions.shape[0])
        batch = AtomicBatch.concatenate([base] * (hi - lo))
        batch = replace(
            batch,
            positions=positions[lo:hi].reshape(-1, 3).to(base.positions.dtype),
            cell=base.cell.expand(hi - lo, 3, 3).clone() if cells is None else cells[lo:hi].to(base.cell.dtype),
        )
        energies.append(_energy_only(model, batch))
    return torch.cat(energies)


def _energy_only(model: Callable, batch: AtomicBatch) -> torch.Tensor:
    """Energies without building a graph for the caller's gradients where the model allows it
    (a model that differentiates internally without enabling gradients itself raises under
    ``no_grad``: then with gradients)."""
    try:
        with torch.no_grad():
            return evaluate(model, batch)["energy"]
    except RuntimeError:
        return evaluate(model, batch)["energy"]


def _relative(diffs: Sequence[float], scales: Sequence[float]) -> float:
    """``max diff / max scale`` (0 when both are 0; inf for a non-finite diff)."""
    if not diffs:
        return 0.0
    diff = max(diffs)
    scale = max(scales) if scales else 0.0
    if not math.isfinite(diff):
        return math.inf
    if scale == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / scale


class _Comparison:
    """Accumulates energy and force differences of a group of structures."""

    def __init__(self) -> None:
        self.energy_diff: list[float] = []
        self.energy_scale: list[float] = []
        self.force_diff: list[float] = []
        self.force_scale: list[float] = []
        self.per_structure: dict[str, dict[str, float]] = {}

    def add(
        self,
        name: str,
        reference_energy: torch.Tensor,
        energy: torch.Tensor,
        reference_forces: torch.Tensor | None = None,
        forces: torch.Tensor | None = None,
    ) -> None:
        e_diff = _max_abs(energy - reference_energy)
        self.energy_diff.append(e_diff)
        self.energy_scale.append(_max_abs(reference_energy))
        entry = {"energy_abs": e_diff}
        if reference_forces is not None and forces is not None:
            f_diff = _max_abs(forces - reference_forces)
            self.force_diff.append(f_diff)
            self.force_scale.append(_max_abs(reference_forces))
            entry["forces_abs"] = f_diff
        self.per_structure[name] = entry

    def values(self, force_scale: float | None = None) -> tuple[float, dict[str, Any]]:
        """(value, details); ``force_scale`` replaces the group's own largest force."""
        energy = _relative(self.energy_diff, self.energy_scale)
        forces = _relative(self.force_diff, self.force_scale if force_scale is None else [force_scale])
        details: dict[str, Any] = {"energy_relative": energy, "structures": self.per_structure}
        if self.force_diff:
            details["forces_relative"] = forces
            details["force_scale"] = max(self.force_scale) if force_scale is None else force_scale
        return max(energy, forces), details


def _max_abs(t: torch.Tensor) -> float:
    if t.numel() == 0:
        return 0.0
    t = t.detach().double()
    if not bool(torch.isfinite(t).all()):
        return math.inf
    return float(t.abs().max())


def _regular(structures: Sequence[Structure]) -> list[Structure]:
    return [s for s in structures if not s.symmetric]


def _symmetric_force_scale(model: Callable, structures: Sequence[Structure], ctx: PropertyContext) -> float | None:
    """The largest force on the regular structures: the scale of force errors on symmetric
    crystals, whose own forces vanish by symmetry (what they hold is the tie rule's artefact)."""
    scales = [_max_abs(ctx.alone(model, s)["forces"]) for s in _regular(structures) if s.num_atoms > 1 and "forces" in ctx.alone(model, s)]
    return max(scales) if scales else None


def _compare_transformed(
    model: Callable,
    structures: Sequence[Structure],
    ctx: PropertyContext,
    transform: Callable[[Structure], tuple[Atoms, np.ndarray | None]],
) -> _Comparison:
    """Each structure's outputs against those of ``transform(structure)``: the new atoms and the
    new index of each original atom's force row (``None``: unchanged)."""
    comparison = _Comparison()
    for structure in structures:
        ref = ctx.alone(model, structure)
        atoms, rows = transform(structure)
        out = evaluate(model, ctx.batch([atoms]))
        forces = out.get("forces")
        if forces is not None and rows is not None:
            forces = forces[torch.as_tensor(rows)]
        comparison.add(structure.name, ref["energy"], out["energy"], ref.get("forces"), forces)
    return comparison


# ---------------------------------------------------------------------- the properties
#: A translation that is not a lattice vector of any default structure (Å).
TRANSLATION = (0.71, -1.37, 2.93)


def translation(model: Callable, structures: Sequence[Structure], ctx: PropertyContext) -> list[PropertyResult]:
    """Outputs unchanged when every atom moves by the same vector."""
    group = _regular(structures)
    if not group:
        return [ctx.not_applicable("translation", "no structures")]

    def shifted(s: Structure) -> tuple[Atoms, None]:
        atoms = s.atoms.copy()
        atoms.positions = atoms.positions + np.asarray(TRANSLATION)
        return atoms, None

    value, details = _compare_transformed(model, group, ctx, shifted).values()
    details["vector"] = list(TRANSLATION)
    return [ctx.result("translation", value, details)]


def rotation(model: Callable, structures: Sequence[Structure], ctx: PropertyContext) -> list[PropertyResult]:
    """Energy invariant and forces equivariant under random rotations (positions and cell);
    relative MADs as in the paper's Appendix A."""
    group = _regular(structures)
    if not group:
        return [ctx.not_applicable("rotation_energy", "no structures")]
    batch = ctx.batch([s.atoms for s in group])
    with warnings.catch_warnings():
        # rotation_mad reads floats off outputs that carry a graph (harmless here)
        warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
        try:
            mad = rotation_mad(model, batch, num_rotations=ctx.num_rotations, seed=ctx.seed)
        except NonFiniteOutput as err:
            # a model that gives NaN or inf fails the property, it does not merely error
            details = {"rotations": ctx.num_rotations, "error": str(err)}
            return [ctx.result("rotation_energy", math.inf, details), ctx.result("rotation_forces", math.inf, details)]
    energy = _ratio(mad["energy_mad"], mad["energy_mean_abs"])
    out = [ctx.result("rotation_energy", energy, {"rotations": ctx.num_rotations, **mad})]
    if "force_mad" in mad:
        forces = _ratio(mad["force_mad"], mad["force_mean_abs"])
        out.append(ctx.result("rotation_forces", forces, {"rotations": ctx.num_rotations, **mad}))
    return out


def _ratio(num: float, den: float) -> float:
    if not (math.isfinite(num) and math.isfinite(den)):
        return math.inf
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def _permutation(
    model: Callable, group: Sequence[Structure], ctx: PropertyContext, force_scale: float | None
) -> tuple[float, dict[str, Any]]:
    def permuted(s: Structure) -> tuple[Atoms, np.ndarray]:
        n = s.num_atoms
        perm = ctx.rng(n).permutation(n)
        if n > 1 and np.array_equal(perm, np.arange(n)):
            perm = perm[::-1].copy()
        # new atom k is old atom perm[k]: old atom i sits at row inverse[i]
        inverse = np.argsort(perm)
        return s.atoms[perm], inverse

    return _compare_transformed(model, group, ctx, permuted).values(force_scale)


def permutation(model: Callable, structures: Sequence[Structure], ctx: PropertyContext) -> list[PropertyResult]:
    """Outputs follow a random reordering of the atoms (constraints and tags move with them).

    ``permutation`` is measured on the regular structures; ``permutation_symmetric`` on the
    symmetric crystals, where a tie rule by atom order can break it (force errors there are
    relative to the largest force on the regular structures: a symmetric crystal's own forces
    vanish by symmetry)."""
    out = []
    for name, group in (("permutation", _regular(structures)), ("permutation_symmetric", [s for s in structures if s.symmetric])):
        if not group:
            out.append(ctx.not_applicable(name, "no such structures"))
            continue
        scale = _symmetric_force_scale(model, structures, ctx) if name.endswith("_symmetric") else None
        value, details = _permutation(model, group, ctx, scale)
        out.append(ctx.result(name, value, details))
    return out


def batching(model: Callable, structures: Sequence[Structure], ctx: PropertyContext) -> list[PropertyResult]:
    """A batch of all structures (in order and reversed) gives each structure's outputs alone."""
    if len(structures) < 2:
        return [ctx.not_applicable("batch", "needs at least two structures")]
    comparison = _Comparison()
    for order_name, order in (("forward", list(structures)), ("reversed", list(structures)[::-1])):
        out = evaluate(model, ctx.batch([s.atoms for s in order]))
        offset = 0
        for index, structure in enumerate(order):
            ref = ctx.alone(model, structure)
            n = structure.num_atoms
            forces = out["forces"][offset : offset + n] if "forces" in out else None
            comparison.add(f"{structure.name} ({order_name})", ref["energy"], out["energy"][index : index + 1], ref.get("forces"), forces)
            offset += n
    value, details = comparison.values()
    return [ctx.result("batch", value, details)]


def wrapping(model: Callable, structures: Sequence[Structure], ctx: PropertyContext) -> list[PropertyResult]:
    """Wrapped positions and positions moved by random lattice vectors (along periodic axes)
    give the outputs of the structure as given."""
    group = [s for s in _regular(structures) if s.periodic_axes.any()]
    if not group:
        return [ctx.not_applicable("wrapping", "no periodic structures")]
    comparison = _Comparison()
    for structure in group:
        ref = ctx.alone(model, structure)
        wrapped = structure.atoms.copy()
        wrapped.wrap()
        unwrapped = structure.atoms.copy()
        shifts = ctx.rng(structure.num_atoms + 1).integers(-2, 3, size=(structure.num_atoms, 3))
        shifts[:, ~structure.periodic_axes] = 0
        shifts[0, np.flatnonzero(structure.periodic_axes)[0]] = 2  # at least one atom moves
        unwrapped.positions = unwrapped.positions + shifts @ unwrapped.cell.array
        for label, atoms in (("wrapped", wrapped), ("unwrapped", unwrapped)):
            out = evaluate(model, ctx.batch([atoms]))
            comparison.add(f"{structure.name} ({label})", ref["energy"], out["energy"], ref.get("forces"), out.get("forces"))
    value, details = comparison.values()
    return [ctx.result("wrapping", value, details)]


def supercell(model: Callable, structures: Sequence[Structure], ctx: PropertyContext) -> list[PropertyResult]:
    """A 2x2x1 supercell (of a structure periodic along a and b) has 4x the energy and the
    cell's forces on every copy. ``supercell`` on regular structures, ``supercell_symmetric``
    on symmetric crystals."""
    out = []
    periodic_ab = [s for s in structures if s.periodic_axes[:2].all()]
    for name, group in (("supercell", _regular(periodic_ab)), ("supercell_symmetric", [s for s in periodic_ab if s.symmetric])):
        if not group:
            out.append(ctx.not_applicable(name, "no structures periodic along a and b"))
            continue
        comparison = _Comparison()
        for structure in group:
            ref = ctx.alone(model, structure)
            big = evaluate(model, ctx.batch([structure.atoms.repeat((2, 2, 1))]))
            forces = None
            if "forces" in big:  # ASE's repeat puts the copies one after the other
                forces = big["forces"].view(4, structure.num_atoms, 3)
            ref_forces = ref.get("forces")
            comparison.add(
                structure.name,
                4 * ref["energy"],
                big["energy"],
                None if ref_forces is None else ref_forces.expand(4, -1, -1),
                forces,
            )
        scale = _symmetric_force_scale(model, structures, ctx) if name.endswith("_symmetric") else None
        value, details = comparison.values(scale)
        out.append(ctx.result(name, value, details))
    return out


def batch_gradient(model: Callable, structures: Sequence[Structure], ctx: PropertyContext) -> list[PropertyResult]:
    """No structure's energy (nor, where forces are differentiable, its forces) depends on the
    positions of another structure of the batch: d E_a / d x_b = 0 for b outside a."""
    group = _regular(structures)
    if len(group) < 2:
        return [ctx.not_applicable("batch_gradient", "needs at least two structures")]
    batch = ctx.batch([s.atoms for s in group])
    positions = batch.positions.clone().requires_grad_(True)
    out = model(replace(batch, positions=positions))
    energy = out["energy"]
    if not energy.requires_grad:
        return [ctx.not_applicable("batch_gradient", "the energy is not differentiable with respect to positions")]
    forces = out.get("forces")
    forces_differentiable = forces is not None and forces.requires_grad
    generator = torch.Generator().manual_seed(ctx.seed)
    inside, outside = [], []
    per_structure = {}
    for a, structure in enumerate(group):
        mask = batch.batch == a
        targets = [(energy[a], "energy")]
        if forces_differentiable:
            weights = torch.randn(int(mask.sum()), 3, generator=generator, dtype=forces.dtype)
            targets.append(((forces[mask] * weights).sum(), "forces"))
        entry = {}
        for target, label in targets:
            (grad,) = torch.autograd.grad(target, positions, retain_graph=True, allow_unused=True)
            if grad is None:
                grad = torch.zeros_like(positions)
            inside.append(_max_abs(grad[mask]))
            leak = _max_abs(grad[~mask])
            outside.append(leak)
            entry[f"{label}_leak"] = leak
        per_structure[structure.name] = entry
    value = _relative(outside, inside)
    return [ctx.result("batch_gradient", value, {"structures": per_structure, "forces_checked": forces_differentiable})]


def _conservative(model: Callable) -> bool:
    return bool(getattr(model, "conservative", False))


def forces_gradient(model: Callable, structures: Sequence[Structure], ctx: PropertyContext) -> list[PropertyResult]:
    """Forces = minus the central-difference gradient of the energy (conservative models,
    float64; ``fd_atoms`` atoms per structure, all three components)."""
    name = "forces_gradient"
    if not _conservative(model):
        return [ctx.not_applicable(name, "the model is not conservative (forces are not -dE/dx)")]
    if ctx.dtype != torch.float64:
        return [ctx.not_applicable(name, "finite differences are checked in float64")]
    h = ctx.tolerances.position_step
    diffs, scales, per_structure = [], [], {}
    for structure in _regular(structures):
        ref = ctx.alone(model, structure)
        if "forces" not in ref:
            return [ctx.not_applicable(name, "the model returns no forces")]
        n = structure.num_atoms
        atoms = np.unique(np.linspace(0, n - 1, min(n, ctx.fd_atoms)).round().astype(int))
        base = ctx.batch([structure.atoms])
        displaced = []
        for i in atoms:
            for k in range(3):
                for sign in (1.0, -1.0):
                    p = base.positions.clone()
                    p[i, k] += sign * h
                    displaced.append(p)
        energies = evaluate_many(model, base, torch.stack(displaced), None, ctx.chunk).view(len(atoms), 3, 2)
        numerical = -(energies[..., 0] - energies[..., 1]) / (2 * h)  # [atoms, 3]
        diff = _max_abs(numerical - ref["forces"][torch.as_tensor(atoms)])
        diffs.append(diff)
        scales.append(_max_abs(ref["forces"]))
        per_structure[structure.name] = {"atoms": atoms.tolist(), "forces_abs": diff}
    value = _relative(diffs, scales)
    return [ctx.result(name, value, {"step": h, "structures": per_structure})]


#: Voigt pairs (xx, yy, zz, yz, xz, xy).
_VOIGT = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))


def stress(model: Callable, structures: Sequence[Structure], ctx: PropertyContext) -> list[PropertyResult]:
    """Stress = (1/V) dE/d(strain) by central differences under symmetric strain
    ``x -> x (I + eps)``, ``cell -> cell (I + eps)`` (conservative models, float64, structures
    periodic along every axis)."""
    name = "stress"
    if not _conservative(model):
        return [ctx.not_applicable(name, "the model is not conservative (no stress)")]
    if ctx.dtype != torch.float64:
        return [ctx.not_applicable(name, "finite differences are checked in float64")]
    group = [s for s in _regular(structures) if s.fully_periodic]
    if not group:
        return [ctx.not_applicable(name, "no structure periodic along all three axes")]
    h = ctx.tolerances.strain_step
    diffs, scales, per_structure = [], [], {}
    for structure in group:
        base = ctx.batch([structure.atoms])
        try:
            analytic = evaluate(model, base, stress=True)
        except TypeError as error:  # a model whose forward has no stress option
            return [ctx.not_applicable(name, f"the model gives no stress: {error}")]
        if "stress" not in analytic:
            return [ctx.not_applicable(name, "the model returns no 'stress'")]
        sigma = analytic["stress"][0]
        positions, cells = [], []
        for i, j in _VOIGT:
            for sign in (1.0, -1.0):
                eps = torch.zeros(3, 3, dtype=torch.float64)
                eps[i, j] += 0.5 * sign * h
                eps[j, i] += 0.5 * sign * h
                deform = torch.eye(3, dtype=torch.float64) + eps
                positions.append(base.positions.double() @ deform)
                cells.append(base.cell[0].double() @ deform)
        energies = evaluate_many(model, base, torch.stack(positions), torch.stack(cells), ctx.chunk).view(6, 2)
        volume = float(torch.linalg.det(base.cell[0].double()).abs())
        numerical = (energies[:, 0] - energies[:, 1]) / (2 * h * volume)
        analytic_voigt = torch.stack([sigma[i, j] for i, j in _VOIGT])
        symmetric = _max_abs(sigma - sigma.T)
        diff = max(_max_abs(numerical - analytic_voigt), symmetric)
        diffs.append(diff)
        scales.append(_max_abs(sigma))
        per_structure[structure.name] = {"stress_abs": diff, "asymmetry": symmetric, "stress_max": _max_abs(sigma)}
    value = _relative(diffs, scales)
    return [ctx.result(name, value, {"step": h, "structures": per_structure})]


#: Distance (Å) between the two copies of an isolated atom: beyond any model's cutoff.
SEPARATION = 40.0


def isolated_atoms(model: Callable, structures: Sequence[Structure], ctx: PropertyContext) -> list[PropertyResult]:
    """A single atom in vacuum has a finite energy and zero force, and two copies far apart
    have twice its energy and zero forces (relative to the largest force on the other
    structures)."""
    name = "isolated_atoms"
    atoms_ = [s for s in structures if s.num_atoms == 1 and not s.periodic_axes.any()]
    if not atoms_:
        return [ctx.not_applicable(name, "no single atom in vacuum among the structures")]
    force_scale = [_max_abs(ctx.alone(model, s).get("forces", torch.zeros(0))) for s in _regular(structures) if s.num_atoms > 1]
    energy_scale, energy_diffs, force_diffs, per_structure = [], [], [], {}
    for structure in atoms_:
        single = ctx.alone(model, structure)
        pair = structure.atoms.copy()
        pair += structure.atoms.copy()
        pair.positions[1] += (SEPARATION, 0.0, 0.0)
        two = evaluate(model, ctx.batch([pair]))
        energy = single["energy"]
        finite = bool(torch.isfinite(energy).all())
        e_diff = _max_abs(two["energy"] - 2 * energy) if finite else math.inf
        energy_diffs.append(e_diff)
        energy_scale.append(_max_abs(2 * energy) if finite else 0.0)
        f = max(_max_abs(single.get("forces", torch.zeros(0))), _max_abs(two.get("forces", torch.zeros(0))))
        force_diffs.append(f)
        per_structure[structure.name] = {
            "energy": float(energy[0]),
            "force_abs": _max_abs(single.get("forces", torch.zeros(0))),
            "pair_energy_abs": e_diff,
            "pair_force_abs": _max_abs(two.get("forces", torch.zeros(0))),
        }
    energy_rel = _relative(energy_diffs, energy_scale)
    # With no other structure to set a force scale, the forces are held to an absolute 1 eV/Å.
    forces_rel = _relative(force_diffs, force_scale or [1.0])
    details = {"energy_relative": energy_rel, "forces_relative": forces_rel, "force_scale": max(force_scale or [1.0]), "structures": per_structure}
    return [ctx.result(name, max(energy_rel, forces_rel), details)]


#: Direction (unit vector) of the smoothness path: in the plane of the default slab, so its
#: adsorbate slides over the surface (as it would diffuse).
SMOOTHNESS_DIRECTION = (0.8, 0.6, 0.0)


def smoothness(model: Callable, structures: Sequence[Structure], ctx: PropertyContext) -> list[PropertyResult]:
    """Report only: the last atom of the first regular structure with several atoms moves
    ``smoothness_length`` Å along a straight line in ``smoothness_steps`` equal steps; the value
    is the largest energy step ``|E_{k+1} - E_k|`` (eV), with the median step in ``details``
    (a smooth energy has steps ~ median; a jump, e.g. a neighbour crossing a hard cutoff, shows
    as a largest step far above it). ``details`` also has the largest and median second
    differences ``|E_{k+1} - 2 E_k + E_{k-1}|``, which for a smooth energy shrink as the square
    of the step and so expose a jump even where the energy is steep."""
    name = "smoothness"
    candidates = [s for s in _regular(structures) if s.num_atoms > 1]
    if not candidates:
        return [ctx.not_applicable(name, "no structure with two or more atoms")]
    structure = candidates[0]
    base = ctx.batch([structure.atoms])
    atom = structure.num_atoms - 1
    steps = ctx.smoothness_steps
    t = torch.linspace(0.0, ctx.smoothness_length, steps + 1, dtype=torch.float64)
    direction = torch.tensor(SMOOTHNESS_DIRECTION, dtype=torch.float64)
    positions = base.positions.double().expand(steps + 1, -1, -1).clone()
    positions[:, atom] += t[:, None] * direction
    energies = evaluate_many(model, base, positions, None, ctx.chunk).double()
    if not bool(torch.isfinite(energies).all()):
        return [ctx.result(name, math.inf, {"structure": structure.name, "error": "non-finite energy on the path"})]
    jumps = (energies[1:] - energies[:-1]).abs()
    second = (energies[2:] - 2 * energies[1:-1] + energies[:-2]).abs() if steps >= 2 else jumps[:0]
    worst = int(jumps.argmax())
    details = {
        "structure": structure.name,
        "atom": atom,
        "steps": steps,
        "length": ctx.smoothness_length,
        "max_step": float(jumps.max()),
        "median_step": float(jumps.median()),
        "max_over_median": _ratio(float(jumps.max()), float(jumps.median())),
        "max_step_at": float(t[worst]),
        "energy_range": float(energies.max() - energies.min()),
    }
    if second.numel():
        details["max_second_difference"] = float(second.max())
        details["median_second_difference"] = float(second.median())
    return [ctx.result(name, float(jumps.max()), details)]


#: The properties, in the order the suite runs them (name -> function).
PROPERTIES: dict[str, PropertyFunction] = {
    "translation": translation,
    "rotation": rotation,
    "permutation": permutation,
    "batch": batching,
    "wrapping": wrapping,
    "supercell": supercell,
    "batch_gradient": batch_gradient,
    "forces_gradient": forces_gradient,
    "stress": stress,
    "isolated_atoms": isolated_atoms,
    "smoothness": smoothness,
}

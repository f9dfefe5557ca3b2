"""Running a model over data sets: S2EF metrics, relaxations for IS2RE / IS2RS, baselines."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator

from .. import sharding
from ..data.batch import AtomicBatch
from ..models.scn import SCN
from .metrics import (
    S2EFMetrics,
    S2EFTargets,
    average_distance_within_threshold,
    average_force_below_threshold,
    minimum_image_distances,
    relaxed_energy_metrics,
)

if TYPE_CHECKING:
    from ..training.distributed import DistributedContext

__all__ = ["evaluate_s2ef", "evaluate_relaxations", "relaxation_metrics", "per_element_baseline", "s2ef_baseline"]


def _batch(frames: list[Atoms], first: int, dtype: torch.dtype, device: str | torch.device) -> AtomicBatch:
    """``AtomicBatch.from_atoms``, its errors naming the structure by its index in the data
    set (the batch's own messages count from the batch's first structure)."""
    try:
        return AtomicBatch.from_atoms(frames, dtype=dtype, device=device)
    except ValueError as err:
        for k, atoms in enumerate(frames):
            try:
                AtomicBatch.from_atoms([atoms], dtype=dtype)
            except ValueError as single:
                raise ValueError(f"structure {first + k}: {_STRUCTURE_PREFIX.sub('', str(single))}") from None
        raise ValueError(f"structures {first}..{first + len(frames) - 1}: {err}") from None


_STRUCTURE_PREFIX = re.compile(r"^structure 0: ")


def _check_prediction(prediction: dict[str, torch.Tensor], batch: AtomicBatch, first: int) -> None:
    """A non-finite prediction would turn a metric into a silent NaN: name the structure."""
    for key, per_atom in (("energy", False), ("forces", True)):
        value = prediction.get(key)
        if value is None:
            continue
        bad = ~torch.isfinite(value.detach().reshape(len(value), -1)).all(dim=1)
        if bad.any():
            index = int(torch.nonzero(bad)[0])
            structure = int(batch.batch[index]) if per_atom else index
            raise ValueError(f"structure {first + structure}: the model predicts a non-finite {key}")


@torch.no_grad()
def evaluate_s2ef(
    model: SCN | Callable[[AtomicBatch], dict[str, torch.Tensor]],
    dataset: Sequence[Atoms],
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    max_structures: int | None = None,
    progress: bool = False,
    ctx: DistributedContext | None = None,
) -> dict[str, float]:
    """S2EF metrics (:class:`~.metrics.S2EFMetrics`) of ``model`` on ``dataset`` (forces
    evaluated on free atoms). A structure may lack a reference energy or forces: each metric
    covers the structures that have what it needs, and the ``num_*_structures`` counts say
    how many that was (NaN metrics cover none). References are read in float64, whatever
    ``dtype`` the model runs in.

    With ``ctx`` (a ``torchrun`` run), each rank evaluates its share of the batches
    (:mod:`~spherical_channels.sharding`) and every rank returns the metrics of all of them:
    the same batches as in one process, their sums added in the same order, so the same
    numbers. An error on one rank is raised on every rank.

    Raises:
        ValueError: ``batch_size`` or ``max_structures`` below 1, a structure the model cannot
            take, a non-finite reference or prediction (the message names the structure).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_structures is not None and max_structures < 1:
        raise ValueError(f"max_structures must be >= 1, got {max_structures}")
    if isinstance(model, torch.nn.Module):
        model.eval()
    count = len(dataset) if max_structures is None else min(max_structures, len(dataset))
    starts = range(0, count, batch_size)

    def work(mine: list[int]) -> list[torch.Tensor]:
        """Each batch's sums (an accumulator of its own, so that they add up as in one pass)."""
        sums = []
        for b in sharding.progress(mine, ctx, desc="S2EF", unit="batch", leave=False, disable=not progress):
            first = starts[b]
            frames = [dataset[i] for i in range(first, min(count, first + batch_size))]
            targets = S2EFTargets.from_atoms(frames, first_index=first)
            batch = _batch(frames, first, dtype, device)
            prediction = model(batch)
            _check_prediction(prediction, batch, first)
            one = S2EFMetrics()
            one.update(prediction, batch, targets=targets)
            sums.append(one.sums)
        return sums

    mine = sharding.run_share(work, len(starts), ctx)
    metrics = S2EFMetrics()
    for _, sums in sharding.gather_in_order(mine, len(starts), ctx, everywhere=True):
        metrics.sums += sums
    return metrics.compute()


def per_element_baseline(element_energies: dict[int, float]) -> Callable[[AtomicBatch], dict[str, torch.Tensor]]:
    """The trivial model: energy = sum of per-element reference energies, forces = 0 (the best
    constant force, as OC20 forces average to zero)."""
    table = torch.zeros(max(int(z) for z in element_energies) + 1 if element_energies else 1, dtype=torch.float64)
    for z, value in element_energies.items():
        table[int(z)] = value

    def predict(batch: AtomicBatch) -> dict[str, torch.Tensor]:
        z = batch.atomic_numbers
        known = z < len(table)
        # an element without a reference energy counts 0 (as DatasetStatistics.reference_energy)
        per_atom = torch.where(known, table.to(z.device)[z.clamp(max=len(table) - 1)], 0.0)
        energy = torch.zeros(batch.num_structures, dtype=torch.float64, device=per_atom.device)
        energy = energy.index_add(0, batch.batch, per_atom)
        return {"energy": energy, "forces": torch.zeros_like(batch.positions)}

    return predict


def s2ef_baseline(dataset: Sequence[Atoms], element_energies: dict[int, float], **kwargs: Any) -> dict[str, float]:
    """S2EF metrics of :func:`per_element_baseline` on ``dataset``."""
    return evaluate_s2ef(per_element_baseline(element_energies), dataset, **kwargs)


def evaluate_relaxations(
    calculator: Calculator | torch.nn.Module,
    initial: Sequence[Atoms],
    optimizer: str | None = None,
    fmax: float = 0.05,
    steps: int = 200,
    reference_calculator: Callable[[], Calculator] | None = None,
    max_structures: int | None = None,
    trajectory_dir: str | None = None,
    progress: bool = False,
    on_failure: Callable[[int, str], None] | None = None,
    ctx: DistributedContext | None = None,
    batch_atoms: int | None = None,
) -> dict[str, Any]:
    """Relax initial structures with the model; IS2RE and IS2RS metrics.

    ``calculator`` is a model (``model(batch) -> {"energy", "forces"}``: the structures are
    relaxed together by the batched engine, :func:`~spherical_channels.simulation.relax_many`,
    at most ``batch_atoms`` atoms per call; ``optimizer`` FIRE or LBFGS, default LBFGS) or an
    ASE calculator (one ASE optimiser per structure; default BFGS).

    Each structure of ``initial`` carries ``info["relaxed_energy"]`` (IS2RE target, eV)
    and/or an array ``relaxed_positions`` (IS2RS target). With ``reference_calculator`` (a
    factory, e.g. ``ase.calculators.emt.EMT`` for the built-in data), the true forces at the
    model-relaxed structures give AFbT.

    A structure that cannot be relaxed (the model or the reference calculator fails on it, its
    targets are malformed) does not stop the others: its record holds ``"error"``, it is
    counted in ``num_failed`` and left out of the metrics, and ``on_failure(index, message)``
    is called. A reference calculator that fails on a relaxed structure leaves that structure
    out of AFbT only (its record holds ``"reference_error"``). Each metric group says how many
    structures it covers (``num_structures``; ``num_afbt_structures`` for AFbT).

    Returns ``{"is2re": {"energy_mae", "ewt", "num_structures"}, "is2rs": {"adwt", "adwt_adsorbate",
    "num_adsorbate_structures", "afbt"?, "num_afbt_structures"?, "mean_distance", "num_structures"},
    "unrelaxed": {...}, "converged_fraction", "mean_steps", "num_structures", "num_relaxed", "num_failed",
    "num_reference_failed", "relaxations": [...]}``; ``converged_fraction`` and ``mean_steps`` are over the
    relaxed structures (NaN when none was).

    ``adwt_adsorbate`` is ADwT over the adsorbate atoms only (free atoms with tag 2, the OC20
    convention: 0 subsurface, 1 surface, 2 adsorbate), over the ``num_adsorbate_structures``
    structures that have such atoms (NaN when none has).

    ``unrelaxed`` is the do-nothing baseline over the same relaxed structures, so a report shows
    whether relaxing helped: the initial structures taken as the prediction. Its ``"is2re"``
    (``energy_mae``, ``ewt``, ``num_structures``, ``energy_source``: ``"model"``) predicts the
    relaxed energy by the model's energy at the initial positions; its ``"is2rs"`` (``adwt``,
    ``adwt_adsorbate``, ``num_adsorbate_structures``, ``mean_distance``, ``num_structures``, and
    ``afbt`` / ``num_afbt_structures`` with ``reference_calculator``: the true forces at the
    initial positions) compares the initial positions with the relaxed targets. Each group is
    present when the model's group is.

    With ``ctx`` (a ``torchrun`` run), each rank relaxes its share of the structures
    (:mod:`~spherical_channels.sharding`; ``on_failure`` is called on the rank that relaxed the
    structure) and every rank returns the metrics of all of them, the records in input order.
    """
    if max_structures is not None and max_structures < 1:
        raise ValueError(f"max_structures must be >= 1, got {max_structures}")
    count = len(initial) if max_structures is None else min(max_structures, len(initial))

    batched = isinstance(calculator, torch.nn.Module)
    if optimizer is None:
        optimizer = "LBFGS" if batched else "BFGS"

    def fail(index: int, message: str) -> dict[str, Any]:
        if on_failure is not None:
            on_failure(index, message)
        return {"index": index, "error": message}

    def work(mine: list[int]) -> list[dict[str, Any]]:
        if batched:
            return _relax_batched(calculator, initial, mine, optimizer, fmax, steps, reference_calculator,
                                  trajectory_dir, progress, fail, batch_atoms)
        records = []
        for index in sharding.progress(mine, ctx, desc="relax", unit="structure", leave=False, disable=not progress):
            trajectory = f"{trajectory_dir}/{index:05d}.traj" if trajectory_dir else None
            try:
                records.append(_relax_one(initial[index], index, calculator, optimizer, fmax, steps,
                                          reference_calculator, trajectory))
            except Exception as err:  # noqa: BLE001 - one structure's failure must not lose the others
                records.append(fail(index, f"{type(err).__name__}: {err}"))
        return records

    mine = sharding.run_share(work, count, ctx)
    records = [record for _, record in sharding.gather_in_order(mine, count, ctx, everywhere=True)]
    return relaxation_metrics(records)


def relaxation_metrics(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """IS2RE/IS2RS metrics, with the unrelaxed rows, of per-structure relaxation records (the
    ``"relaxations"`` of :func:`evaluate_relaxations`, which returns exactly this dict); records
    of several calls may be pooled."""
    records = list(records)
    energies, targets, distances, true_forces = [], [], [], []
    initial_energies, initial_distances, initial_forces = [], [], []
    adsorbate_distances, initial_adsorbate_distances = [], []
    for record in records:
        if "error" in record:
            continue
        if "relaxed_energy" in record:
            energies.append(record["energy"])
            targets.append(record["relaxed_energy"])
            initial_energies.append(record["initial_energy"])
        if "mean_distance" in record:
            distances.append(record["mean_distance"])
            initial_distances.append(record["initial_mean_distance"])
            if "adsorbate_mean_distance" in record:
                adsorbate_distances.append(record["adsorbate_mean_distance"])
                initial_adsorbate_distances.append(record["initial_adsorbate_mean_distance"])
            if "true_max_force" in record:
                true_forces.append(record["true_max_force"])
            if "initial_true_max_force" in record:
                initial_forces.append(record["initial_true_max_force"])
    relaxed = [r for r in records if "error" not in r]
    out: dict[str, Any] = {
        "num_structures": len(records),
        "num_relaxed": len(relaxed),
        "num_failed": len(records) - len(relaxed),
        "num_reference_failed": sum("reference_error" in r for r in relaxed),
        "converged_fraction": float(np.mean([r["converged"] for r in relaxed])) if relaxed else float("nan"),
        "mean_steps": float(np.mean([r["steps"] for r in relaxed])) if relaxed else float("nan"),
        "relaxations": records,
    }
    unrelaxed: dict[str, Any] = {}
    if energies:
        out["is2re"] = {**relaxed_energy_metrics(energies, targets), "num_structures": len(energies)}
        unrelaxed["is2re"] = {**relaxed_energy_metrics(initial_energies, targets), "num_structures": len(energies),
                              "energy_source": "model"}
    if distances:
        out["is2rs"] = _is2rs_metrics(distances, adsorbate_distances, true_forces)
        unrelaxed["is2rs"] = _is2rs_metrics(initial_distances, initial_adsorbate_distances, initial_forces)
    if unrelaxed:
        out["unrelaxed"] = unrelaxed
    return out


def _is2rs_metrics(distances: list[float], adsorbate: list[float], true_forces: list[float]) -> dict[str, Any]:
    """ADwT (all free atoms, and adsorbate atoms only), mean distance, and AFbT when some
    structure's true forces are known."""
    metrics: dict[str, Any] = {
        "adwt": average_distance_within_threshold(distances),
        "adwt_adsorbate": average_distance_within_threshold(adsorbate),
        "num_adsorbate_structures": len(adsorbate),
        "mean_distance": float(np.mean(distances)),
        "num_structures": len(distances),
    }
    if true_forces:
        # AFbT over the structures with an IS2RS target whose true forces are known
        metrics["afbt"] = average_force_below_threshold(true_forces)
        metrics["num_afbt_structures"] = len(true_forces)
    return metrics


def _targets(atoms: Atoms) -> tuple[float | None, np.ndarray | None]:
    """``(relaxed_energy, relaxed_positions [N, 3])`` of ``atoms`` (None where absent); raises
    ValueError for malformed targets."""
    reference_positions = None
    if "relaxed_positions" in atoms.arrays:
        reference_positions = np.asarray(atoms.arrays["relaxed_positions"], dtype=float)
        if reference_positions.shape != (len(atoms), 3) or not np.isfinite(reference_positions).all():
            raise ValueError(f"relaxed_positions must be {len(atoms)} finite rows of 3, got shape "
                             f"{reference_positions.shape}")
    relaxed_energy = None
    if "relaxed_energy" in atoms.info:
        relaxed_energy = float(atoms.info["relaxed_energy"])
        if not np.isfinite(relaxed_energy):
            raise ValueError(f"non-finite relaxed_energy {atoms.info['relaxed_energy']!r}")
    return relaxed_energy, reference_positions


def _relax_one(
    atoms: Atoms,
    index: int,
    calculator: Calculator,
    optimizer: str,
    fmax: float,
    steps: int,
    reference_calculator: Callable[[], Calculator] | None,
    trajectory: str | None,
) -> dict[str, Any]:
    """One structure's relaxation record with an ASE optimiser (see :func:`evaluate_relaxations`)."""
    from ..simulation.relax import relax

    targets = _targets(atoms)
    # the model's energy at the initial positions (the unrelaxed IS2RE baseline); the optimiser's
    # first evaluation at the same positions then comes from the calculator's cache
    start = atoms.copy()
    start.calc = calculator
    initial_energy = float(start.get_potential_energy())
    if not np.isfinite(initial_energy):
        raise ValueError("the calculator returned a non-finite energy at the initial structure")
    result = relax(atoms, calculator, optimizer=optimizer, fmax=fmax, steps=steps, trajectory=trajectory)
    return _relaxation_record(atoms, index, result.atoms, result.converged, result.steps, result.energy,
                              initial_energy, targets, reference_calculator)


def _relaxation_record(
    atoms: Atoms,
    index: int,
    relaxed: Atoms,
    converged: bool,
    steps: int,
    energy: float,
    initial_energy: float,
    targets: tuple[float | None, np.ndarray | None],
    reference_calculator: Callable[[], Calculator] | None,
) -> dict[str, Any]:
    """The record of one finished relaxation of ``atoms`` (initial) to ``relaxed``."""
    from ..simulation.relax import max_free_force

    relaxed_energy, reference_positions = targets
    record: dict[str, Any] = {"index": index, "converged": bool(converged), "steps": int(steps),
                              "energy": float(energy), "initial_energy": float(initial_energy)}
    if relaxed_energy is not None:
        record["relaxed_energy"] = relaxed_energy
    if reference_positions is not None:
        free = ~_fixed_mask(atoms)
        adsorbate = free & (atoms.get_tags() == 2)
        for prefix, positions in (("", relaxed.positions), ("initial_", atoms.positions)):
            record[f"{prefix}mean_distance"] = _mean_distance(positions, reference_positions, free, atoms)
            if adsorbate.any():
                record[f"{prefix}adsorbate_mean_distance"] = _mean_distance(positions, reference_positions, adsorbate,
                                                                            atoms)
    if reference_calculator is not None:
        # one reference calculator per structure, for the relaxed and the initial positions
        try:
            reference = reference_calculator()
        except Exception as err:  # noqa: BLE001 - e.g. EMT lacks an element: keep the relaxation
            record["reference_error"] = record["initial_reference_error"] = f"{type(err).__name__}: {err}"
        else:
            for prefix, structure in (("", relaxed), ("initial_", atoms)):
                probe = structure.copy()
                try:
                    probe.calc = reference
                    record[f"{prefix}true_max_force"] = max_free_force(probe)
                except Exception as err:  # noqa: BLE001 - e.g. EMT lacks an element: keep the relaxation
                    record[f"{prefix}reference_error"] = f"{type(err).__name__}: {err}"
    return record


def _relax_batched(
    model: torch.nn.Module,
    initial: Sequence[Atoms],
    mine: list[int],
    optimizer: str,
    fmax: float,
    steps: int,
    reference_calculator: Callable[[], Calculator] | None,
    trajectory_dir: str | None,
    progress: bool,
    fail: Callable[[int, str], dict[str, Any]],
    batch_atoms: int | None,
) -> list[dict[str, Any]]:
    """The records of ``mine`` relaxed by the batched engine, in the order of ``mine``."""
    from ..simulation.engine import model_dtype_device, relax_many

    records: dict[int, dict[str, Any]] = {}
    entries: list[tuple[int, Atoms, tuple[float | None, np.ndarray | None]]] = []
    for index in mine:
        try:
            atoms = initial[index]
            entries.append((index, atoms, _targets(atoms)))
        except Exception as err:  # noqa: BLE001 - one structure's failure must not lose the others
            records[index] = fail(index, f"{type(err).__name__}: {err}")
    outcomes = relax_many(
        [atoms for _, atoms, _ in entries], model, optimizer=optimizer, fmax=fmax, steps=steps,
        max_atoms=batch_atoms, dtype=model_dtype_device(model)[0], progress=progress,
        trajectories=[f"{trajectory_dir}/{index:05d}.traj" for index, *_ in entries] if trajectory_dir else None,
    ) if entries else []
    for (index, atoms, targets), outcome in zip(entries, outcomes):
        if outcome.error is not None:
            records[index] = fail(index, outcome.error)
            continue
        try:
            # the engine's first evaluation is at the input: the unrelaxed IS2RE baseline
            records[index] = _relaxation_record(atoms, index, outcome.atoms, outcome.converged, outcome.steps,
                                                outcome.energy, outcome.initial_energy, targets, reference_calculator)
        except Exception as err:  # noqa: BLE001
            records[index] = fail(index, f"{type(err).__name__}: {err}")
    return [records[index] for index in mine]


def _mean_distance(positions: np.ndarray, reference: np.ndarray, mask: np.ndarray, atoms: Atoms) -> float:
    """Mean minimum-image distance of the ``mask`` atoms to the reference (0 for none)."""
    d = minimum_image_distances(positions[mask], reference[mask], atoms.cell.array, atoms.pbc)
    return float(d.mean()) if d.size else 0.0


def _fixed_mask(atoms: Atoms) -> np.ndarray:
    from ase.constraints import FixAtoms

    mask = np.zeros(len(atoms), dtype=bool)
    for constraint in atoms.constraints:
        if isinstance(constraint, FixAtoms):
            mask[constraint.get_indices()] = True
    return mask

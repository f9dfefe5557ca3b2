"""Running a model over data: S2EF with incomplete references, baselines, relaxations that fail."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import fcc111
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms

from spherical_channels.data.batch import AtomicBatch
from spherical_channels.evaluation.evaluate import evaluate_relaxations, evaluate_s2ef, per_element_baseline


def dimer(z: str, distance: float, energy: float | None, forces: list | None) -> Atoms:
    atoms = Atoms(z * 2, positions=[[0, 0, 0], [0, 0, distance]], cell=np.eye(3) * 10.0, pbc=False)
    results = {k: v for k, v in (("energy", energy), ("forces", forces)) if v is not None}
    if results:
        atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms


def constant_model(energy: float, force: float):
    """Energy ``energy`` per structure, force (0, 0, ``force``) on every atom."""

    def predict(batch: AtomicBatch) -> dict[str, torch.Tensor]:
        forces = torch.zeros(len(batch.positions), 3, dtype=torch.float64)
        forces[:, 2] = force
        return {"energy": torch.full((batch.num_structures,), energy, dtype=torch.float64), "forces": forces}

    return predict


def test_a_structure_without_forces_does_not_drop_the_force_metrics_of_its_batch() -> None:
    """The reported defect: with one structure lacking forces in the batch, the batch's force
    errors (5 eV/A here) were dropped and EFwT came out 1.0 from the energies alone."""
    zero = [[0, 0, 0], [0, 0, 0]]
    data = [dimer("H", 0.8, 1.0, zero), dimer("H", 0.8, 1.0, None), dimer("H", 0.8, 1.0, zero)]
    m = evaluate_s2ef(constant_model(1.0, 5.0), data, batch_size=3)
    assert m["force_mae"] == pytest.approx(5.0 / 3)  # one component of three is off by 5
    assert m["force_l2mae"] == pytest.approx(5.0)
    assert m["efwt"] == 0.0 and m["energy_mae"] == 0.0
    assert (m["num_structures"], m["num_energy_structures"], m["num_force_structures"], m["num_efwt_structures"]) == (3, 3, 2, 2)
    # batch by batch or all at once: the same sums
    assert evaluate_s2ef(constant_model(1.0, 5.0), data, batch_size=1) == m


def test_data_without_energies_gives_the_force_metrics_and_no_traceback() -> None:
    zero = [[0, 0, 0], [0, 0, 0]]
    data = [dimer("H", 0.8, None, zero), dimer("H", 0.9, None, zero)]
    m = evaluate_s2ef(constant_model(1.0, 0.01), data, batch_size=2)
    assert math.isnan(m["energy_mae"]) and math.isnan(m["efwt"])
    assert m["num_energy_structures"] == 0 and m["num_efwt_structures"] == 0
    assert m["force_mae"] == pytest.approx(0.01 / 3) and m["num_force_structures"] == 2


def test_references_are_read_in_float64_whatever_the_model_dtype() -> None:
    """A float32 batch would round a -1234.5678 eV reference by ~3e-5 eV."""
    energy = -1234.567891
    data = [dimer("H", 0.8, energy, [[0, 0, 0], [0, 0, 0]])]
    m = evaluate_s2ef(constant_model(energy, 0.0), data, dtype=torch.float32)
    assert m["energy_mae"] == 0.0


def test_bad_structures_and_predictions_are_named() -> None:
    zero = [[0, 0, 0], [0, 0, 0]]
    data = [dimer("H", 0.8, 1.0, zero), dimer("H", 0.8, 1.0, zero), dimer("H", 0.8, 1.0, zero)]
    data[2].positions[1, 0] = np.nan
    with pytest.raises(ValueError, match=r"^structure 2: non-finite .*positions"):  # the third of the batch
        evaluate_s2ef(constant_model(1.0, 0.0), data, batch_size=3)
    with pytest.raises(ValueError, match="structure 0: the model predicts a non-finite energy"):
        evaluate_s2ef(constant_model(float("nan"), 0.0), data[:2])
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_s2ef(constant_model(1.0, 0.0), data, batch_size=0)


def test_baseline_counts_zero_for_an_element_it_has_no_energy_for() -> None:
    """Unknown elements were clamped onto the last table entry (O's energy for Pt)."""
    predict = per_element_baseline({1: -0.5, 8: -2.0})
    batch = AtomicBatch.from_atoms([Atoms("OH", positions=[[0, 0, 0], [0, 0, 1]]), Atoms("PtH", positions=[[0, 0, 0], [0, 0, 2]])])
    energy = predict(batch)["energy"]
    np.testing.assert_allclose(energy.numpy(), [-2.5, -0.5], atol=0)


def slab(symbol: str = "Cu") -> Atoms:
    atoms = fcc111(symbol, (1, 1, 2), vacuum=4.0)
    atoms.set_constraint(FixAtoms(indices=[0]))
    atoms.rattle(0.05, seed=1)
    return atoms


def test_a_failing_relaxation_is_reported_and_the_others_kept(tmp_path) -> None:
    """EMT stands in for the model: it refuses elements it does not know (NotImplementedError)."""
    good = slab()
    good.info["relaxed_energy"] = 0.0
    good.arrays["relaxed_positions"] = good.positions.copy()
    unknown = slab()
    unknown.set_chemical_symbols(["Cu", "U"])
    unknown.info["relaxed_energy"] = 0.0
    malformed = slab()
    malformed.arrays["relaxed_positions"] = good.positions.copy()
    malformed.arrays["relaxed_positions"][0] = np.nan
    failures = []
    out = evaluate_relaxations(EMT(), [good, unknown, malformed, good], steps=5, reference_calculator=EMT,
                               trajectory_dir=str(tmp_path), on_failure=lambda i, m: failures.append((i, m)))
    assert [i for i, _ in failures] == [1, 2]
    assert "NotImplementedError" in failures[0][1] and "relaxed_positions" in failures[1][1]
    assert (out["num_structures"], out["num_relaxed"], out["num_failed"]) == (4, 2, 2)
    assert out["is2re"]["num_structures"] == 2 and out["is2rs"]["num_structures"] == 2
    assert 0 <= out["is2rs"]["afbt"] <= 1 and out["mean_steps"] <= 5
    assert [r.get("error") is None for r in out["relaxations"]] == [True, False, False, True]


def test_plots_skip_values_without_references(tmp_path) -> None:
    """NaN references (structures without them) or no free atoms used to fail the plot
    (``min`` of an empty array) or draw NaN-scaled axes; NaN/empty log rows likewise."""
    from spherical_channels.evaluation.plots import learning_curves, parity_plots

    path = parity_plots(np.array([1.0, 2.0]), np.array([np.nan, 2.1]), np.array([2, 2]), np.zeros((0, 3)),
                        np.zeros((0, 3)), tmp_path / "parity.png")
    assert path.stat().st_size > 0
    train = [{"step": 0, "loss": 1.0}, {"step": 1, "loss": float("nan")}, {"step": 2, "loss": 0.5}]
    val = [{"step": 1, "energy_mae": float("nan"), "force_mae": 0.2}, {"step": 2, "energy_mae": None, "force_mae": 0.1}]
    assert learning_curves(train, val, tmp_path / "curves.png").stat().st_size > 0


def test_a_failing_reference_calculator_costs_afbt_only() -> None:
    """A reference that cannot evaluate a structure (EMT and an element it lacks) used to end
    the whole evaluation; now the relaxation counts for IS2RS and only AFbT leaves it out."""
    first, second = slab(), slab()
    for atoms in (first, second):
        atoms.arrays["relaxed_positions"] = atoms.positions.copy()
    calls = []

    def reference() -> EMT:
        calls.append(1)
        if len(calls) == 2:
            raise NotImplementedError("no EMT parameters for this element")
        return EMT()

    out = evaluate_relaxations(EMT(), [first, second], steps=3, reference_calculator=reference)
    assert out["num_failed"] == 0 and out["num_reference_failed"] == 1
    assert out["is2rs"]["num_structures"] == 2 and out["is2rs"]["num_afbt_structures"] == 1
    assert "NotImplementedError" in out["relaxations"][1]["reference_error"]


def tagged_slab() -> Atoms:
    """A 2x2x2 Cu slab (bottom layer fixed, tag 0; top layer tag 1) with an O adsorbate (tag 2)."""
    atoms = fcc111("Cu", (2, 2, 2), vacuum=5.0)
    atoms += Atoms("O", positions=[atoms.positions[-1] + [0.0, 0.0, 1.8]])
    atoms.set_tags([0] * 4 + [1] * 4 + [2])
    atoms.set_constraint(FixAtoms(indices=[0, 1, 2, 3]))
    atoms.info.pop("adsorbate_info", None)
    return atoms


def test_unrelaxed_structures_at_their_relaxed_positions_score_adwt_one() -> None:
    """Initial positions equal to the relaxed targets: the unrelaxed baseline is perfect on IS2RS
    (ADwT 1, adsorbate ADwT 1, distance 0), and its IS2RE error is the model's energy at the
    initial positions against the target."""
    frames = []
    for shift in (0.0, 0.02):
        atoms = tagged_slab()
        atoms.positions[-1, 2] += shift
        atoms.arrays["relaxed_positions"] = atoms.positions.copy()
        probe = atoms.copy()
        probe.calc = EMT()
        atoms.info["relaxed_energy"] = probe.get_potential_energy() - 0.5  # 0.5 eV below the initial energy
        frames.append(atoms)
    out = evaluate_relaxations(EMT(), frames, steps=3, reference_calculator=EMT)
    unrelaxed = out["unrelaxed"]
    assert unrelaxed["is2rs"]["adwt"] == 1.0 and unrelaxed["is2rs"]["adwt_adsorbate"] == 1.0
    assert unrelaxed["is2rs"]["mean_distance"] == 0.0
    assert unrelaxed["is2rs"]["num_structures"] == 2 and unrelaxed["is2rs"]["num_adsorbate_structures"] == 2
    assert unrelaxed["is2re"]["energy_mae"] == pytest.approx(0.5) and unrelaxed["is2re"]["ewt"] == 0.0
    assert unrelaxed["is2re"]["energy_source"] == "model" and unrelaxed["is2re"]["num_structures"] == 2
    assert unrelaxed["is2rs"]["num_afbt_structures"] == 2 and 0 <= unrelaxed["is2rs"]["afbt"] <= 1
    # the model row is the relaxed structures': they moved off the targets, and ran downhill
    assert out["is2rs"]["mean_distance"] > 0 and out["is2rs"]["num_adsorbate_structures"] == 2
    for record in out["relaxations"]:
        assert record["energy"] < record["initial_energy"] and record["initial_mean_distance"] == 0.0


def test_unrelaxed_is2re_uses_the_models_initial_energy_not_the_reference() -> None:
    """With a model (here EMT shifted by +1 eV) the unrelaxed IS2RE error is the model's energy at
    the initial positions minus the target, whatever reference energy the frame carries."""
    atoms = tagged_slab()
    atoms.arrays["relaxed_positions"] = atoms.positions.copy()
    probe = atoms.copy()
    probe.calc = EMT()
    emt_energy = probe.get_potential_energy()
    atoms.info["relaxed_energy"] = emt_energy
    atoms.calc = SinglePointCalculator(atoms, energy=emt_energy - 7.0)  # a stored reference: not used

    class Shifted(EMT):
        def calculate(self, *args, **kwargs):  # noqa: ANN002, ANN003
            super().calculate(*args, **kwargs)
            self.results["energy"] += 1.0
            self.results["free_energy"] += 1.0

    out = evaluate_relaxations(Shifted(), [atoms], steps=0)
    assert out["unrelaxed"]["is2re"]["energy_mae"] == pytest.approx(1.0)
    assert out["relaxations"][0]["initial_energy"] == pytest.approx(emt_energy + 1.0)
    assert "afbt" not in out["unrelaxed"]["is2rs"]  # no reference calculator


def test_adsorbate_adwt_ignores_displaced_slab_atoms() -> None:
    """Free slab atoms 0.3 A off their targets, the adsorbate on its target: ADwT over all free
    atoms is below 1, ADwT over the adsorbate (tag 2) alone is 1. Slabs without tag-2 atoms are
    left out of the adsorbate metric (NaN when none has one)."""
    atoms = tagged_slab()
    target = atoms.positions.copy()
    target[4:8, 0] += 0.3  # surface atoms (tag 1, free) displaced, O (tag 2) in place
    atoms.arrays["relaxed_positions"] = target
    bare = tagged_slab()[:8]  # no adsorbate
    bare.set_constraint(FixAtoms(indices=[0, 1, 2, 3]))
    bare.arrays["relaxed_positions"] = bare.positions.copy()
    bare.arrays["relaxed_positions"][4:8, 0] += 0.3
    # steps=0: the "relaxed" structure is the initial one, so model and unrelaxed rows agree
    out = evaluate_relaxations(EMT(), [atoms, bare], steps=0)
    for group in (out["is2rs"], out["unrelaxed"]["is2rs"]):
        assert group["adwt_adsorbate"] == 1.0 and group["num_adsorbate_structures"] == 1
        assert group["adwt"] < 0.5 and group["num_structures"] == 2
    assert math.isnan(evaluate_relaxations(EMT(), [bare], steps=0)["is2rs"]["adwt_adsorbate"])
    assert evaluate_relaxations(EMT(), [bare], steps=0)["is2rs"]["num_adsorbate_structures"] == 0


def test_the_unrelaxed_baseline_covers_the_structures_the_model_row_covers() -> None:
    """A failing relaxation leaves both rows; a reference failure at the initial positions only
    leaves the unrelaxed AFbT."""
    good, unknown = tagged_slab(), tagged_slab()
    unknown.set_chemical_symbols(["Cu"] * 8 + ["U"])
    for atoms in (good, unknown):
        atoms.arrays["relaxed_positions"] = atoms.positions.copy()
        atoms.info["relaxed_energy"] = 0.0
    initial = good.positions.copy()

    class RefusesTheInitialPositions(EMT):
        def calculate(self, atoms=None, *args, **kwargs):  # noqa: ANN002, ANN003
            if np.allclose(atoms.positions, initial):
                raise RuntimeError("cannot evaluate the initial positions")
            super().calculate(atoms, *args, **kwargs)

    out = evaluate_relaxations(EMT(), [good, unknown, good], steps=2, reference_calculator=RefusesTheInitialPositions)
    assert out["num_failed"] == 1 and out["num_reference_failed"] == 0
    assert out["unrelaxed"]["is2re"]["num_structures"] == out["is2re"]["num_structures"] == 2
    assert out["unrelaxed"]["is2rs"]["num_structures"] == out["is2rs"]["num_structures"] == 2
    assert out["is2rs"]["num_afbt_structures"] == 2 and "afbt" not in out["unrelaxed"]["is2rs"]
    assert "RuntimeError" in out["relaxations"][0]["initial_reference_error"]


def test_batched_and_ase_relaxations_give_the_same_metrics(tmp_path) -> None:
    """A model relaxes its structures with the batched engine; the same potential behind an
    ASE calculator with ASE's FIRE gives the same records (float64: to round-off). A
    malformed target and an overlapping structure fail alone on both paths."""
    from spherical_channels.simulation import SCNCalculator
    from spherical_channels.testing.potentials import MorsePotential

    model = MorsePotential().to(torch.float64)
    frames = []
    for k in range(3):
        atoms = fcc111("Cu", (2, 2, 2), vacuum=5.0)
        atoms.set_constraint(FixAtoms(indices=[0, 1, 2, 3]))
        atoms.set_tags([1] * 6 + [2] * 2)
        atoms.arrays["relaxed_positions"] = atoms.positions.copy()
        atoms.info["relaxed_energy"] = -3.0
        atoms.rattle(0.05 + 0.02 * k, seed=k)
        frames.append(atoms)
    malformed = frames[0].copy()
    malformed.arrays["relaxed_positions"] = np.full((len(malformed), 3), np.nan)
    overlapping = frames[1].copy()
    overlapping.positions[7] = overlapping.positions[6]
    data = [frames[0], malformed, frames[1], overlapping, frames[2]]
    failures: dict[str, list[int]] = {"batched": [], "ase": []}
    out = {}
    for name, calculator in (("batched", model), ("ase", SCNCalculator(model, dtype=torch.float64))):
        out[name] = evaluate_relaxations(calculator, data, "FIRE", fmax=0.05, steps=30, reference_calculator=EMT,
                                         on_failure=lambda i, m, name=name: failures[name].append(i))
    assert failures["batched"] == failures["ase"] == [1, 3]
    for b, a in zip(out["batched"]["relaxations"], out["ase"]["relaxations"]):
        assert set(b) == set(a) and b["index"] == a["index"]
        for key, value in a.items():
            if isinstance(value, float):
                assert b[key] == pytest.approx(value, rel=1e-9, abs=1e-9), key
            elif key != "error":
                assert b[key] == value, key
    assert out["batched"]["is2rs"] == pytest.approx(out["ase"]["is2rs"], rel=1e-9)
    assert out["batched"]["mean_steps"] == out["ase"]["mean_steps"] > 1

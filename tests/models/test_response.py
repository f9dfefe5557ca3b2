"""Forces and stress as derivatives of the energy (float64, central finite differences)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk, fcc111

from spherical_channels.data.batch import AtomicBatch
from spherical_channels.models import SCN
from spherical_channels.models.response import NoStressError, voigt

from scn_helpers import scale_like_fixtures

SMALL = dict(num_interactions=2, lmax=3, mmax=1, sphere_channels=8, sphere_channels_reduce=8, hidden_channels=16,
             num_sphere_samples=16, num_basis_functions=8, max_num_neighbors=20, cutoff=4.5, max_num_elements=30)


def _model(direct_forces: bool = False) -> SCN:
    torch.manual_seed(0)
    return scale_like_fixtures(SCN(**SMALL, direct_forces=direct_forces)).double().eval()


def _strained_cu() -> "ase.Atoms":  # noqa: F821
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    deform = np.eye(3) + np.array([[0.02, 0.01, 0.0], [0.01, -0.01, 0.005], [0.0, 0.005, 0.015]])
    atoms.set_cell(atoms.cell.array @ deform, scale_atoms=True)
    atoms.rattle(0.03, seed=2)
    return atoms


def _energy(model: SCN, atoms) -> float:  # noqa: ANN001
    return float(model(AtomicBatch.from_atoms([atoms], dtype=torch.float64))["energy"][0])


def _derivative(f, h: float) -> float:  # noqa: ANN001
    """Five-point central difference of ``f(t)`` at 0: error O(h^4), which the narrow Gaussian
    distance basis (width 0.02 Å, so large third derivatives) needs for 1e-6 agreement."""
    return (8 * (f(h) - f(-h)) - (f(2 * h) - f(-2 * h))) / (12 * h)


def test_stress_is_the_strain_derivative_of_the_energy() -> None:
    model = _model()
    atoms = _strained_cu()
    stress = model(AtomicBatch.from_atoms([atoms], dtype=torch.float64), stress=True)["stress"][0].numpy()
    h, volume = 1e-5, atoms.get_volume()
    steps = (h, -h, 2 * h, -2 * h)
    pairs = [(i, j) for i in range(3) for j in range(i, 3)]
    strained = []
    for i, j in pairs:
        for t in steps:
            eps = np.zeros((3, 3))
            eps[i, j] += t / 2
            eps[j, i] += t / 2
            copy = atoms.copy()
            copy.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)
            strained.append(copy)
    energies = model(AtomicBatch.from_atoms(strained, dtype=torch.float64))["energy"].numpy().reshape(-1, 4)
    numerical = np.zeros((3, 3))
    for (i, j), (e1, em1, e2, em2) in zip(pairs, energies):
        # five-point central difference, error O(h^4) (see _derivative)
        numerical[i, j] = numerical[j, i] = (8 * (e1 - em1) - (e2 - em2)) / (12 * h) / volume
    assert np.abs(numerical).max() > 1e-3  # the test has something to compare
    np.testing.assert_allclose(stress, numerical, rtol=0, atol=1e-6 * np.abs(numerical).max())
    np.testing.assert_allclose(stress, stress.T, atol=1e-14)


def test_forces_are_minus_the_numerical_gradient() -> None:
    model = _model()
    atoms = _strained_cu()
    forces = model(AtomicBatch.from_atoms([atoms], dtype=torch.float64))["forces"].numpy()
    h = 1e-5
    for atom, axis in [(0, 0), (1, 2), (3, 1)]:

        def moved_energy(t: float) -> float:
            moved = atoms.copy()
            moved.positions[atom, axis] += t
            return _energy(model, moved)

        numerical = -_derivative(moved_energy, h)
        assert forces[atom, axis] == pytest.approx(numerical, rel=1e-6, abs=1e-8)


def test_stress_of_a_batch_is_per_structure_and_voigt_follows_ase() -> None:
    model = _model()
    a, b = _strained_cu(), bulk("Cu", "fcc", a=3.7, cubic=True)
    b.rattle(0.02, seed=5)
    together = model(AtomicBatch.from_atoms([a, b], dtype=torch.float64), stress=True)["stress"]
    for k, atoms in enumerate((a, b)):
        alone = model(AtomicBatch.from_atoms([atoms], dtype=torch.float64), stress=True)["stress"][0]
        torch.testing.assert_close(together[k], alone, rtol=1e-10, atol=1e-12)
    s = torch.arange(9.0).reshape(3, 3)
    s = s + s.T
    assert voigt(s).tolist() == [s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]]


def test_no_stress_for_direct_forces_or_non_periodic_structures() -> None:
    batch = AtomicBatch.from_atoms([_strained_cu()], dtype=torch.float64)
    with pytest.raises(NoStressError, match="direct force head"):
        _model(direct_forces=True)(batch, stress=True)
    slab = fcc111("Cu", size=(2, 2, 2), vacuum=5.0)
    with pytest.raises(NoStressError, match="periodic along all three axes"):
        _model()(AtomicBatch.from_atoms([slab], dtype=torch.float64), stress=True)


def test_eval_outputs_carry_no_graph_but_training_outputs_do() -> None:
    model = _model()
    batch = AtomicBatch.from_atoms([_strained_cu()], dtype=torch.float64)
    out = model(batch, stress=True)
    assert not any(v.requires_grad for v in out.values())
    model.train()
    out = model(batch)
    assert out["energy"].requires_grad and out["forces"].requires_grad  # a force loss can train


@pytest.mark.parametrize("smooth", [False, True])
def test_force_training_gradients_equal_on_both_operation_paths(monkeypatch: pytest.MonkeyPatch, smooth: bool) -> None:
    """Training on energy-conserving forces builds the graph with the plain chains
    (``differentiated_twice``); the parameter gradients of a force loss are those of the
    memory-lean path, to float64 round-off."""
    import contextlib

    import spherical_channels.models.response as response

    torch.manual_seed(0)
    model = scale_like_fixtures(SCN(**SMALL, direct_forces=False, smooth=smooth, zbl=smooth)).double().train()
    slab = fcc111("Cu", (2, 2, 2), vacuum=5.0)
    slab.rattle(0.05, seed=3)
    batch = AtomicBatch.from_atoms([slab, _strained_cu()], dtype=torch.float64)
    target = torch.randn(batch.positions.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def gradients() -> list[torch.Tensor]:
        torch.manual_seed(5)  # the same random edge-frame rolls (training mode) on both paths
        model.zero_grad()
        out = model(batch)
        ((out["forces"] - target).norm(dim=1).mean() + out["energy"].sum()).backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    twice = gradients()
    monkeypatch.setattr(response, "differentiated_twice", contextlib.nullcontext)
    lean = gradients()
    assert len(twice) == len(lean) > 10
    for a, b in zip(twice, lean):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)

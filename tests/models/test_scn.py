"""Properties of the SCN model: variants, forces, symmetries, bad input."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import fcc111, molecule
from ase.io import read

from spherical_channels.data.batch import AtomicBatch
from spherical_channels.data.neighbors import build_graph
from spherical_channels.diagnostics import rotation_mad
from spherical_channels.models import SCN

from scn_helpers import scale_like_fixtures

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SMALL = dict(
    num_interactions=2,
    lmax=4,
    mmax=1,
    sphere_channels=8,
    sphere_channels_reduce=8,
    hidden_channels=16,
    num_sphere_samples=16,
    num_basis_functions=8,
    max_num_neighbors=40,
    basis_width_scalar=2.0,
)


def make_model(dtype=torch.float64, seed: int = 0, **kwargs) -> SCN:
    torch.manual_seed(seed)
    return scale_like_fixtures(SCN(**{**SMALL, **kwargs})).to(dtype).eval()


@pytest.fixture(scope="module")
def structures() -> list[Atoms]:
    return read(FIXTURES / "structures_small.extxyz", ":")


def small_slab() -> Atoms:
    slab = fcc111("Cu", size=(2, 2, 3), vacuum=6.0)
    slab.pbc = True
    slab.rattle(0.05, seed=1)
    return slab


VARIANTS = {
    "m0": dict(mmax=0),
    "m1-4tap-2band": dict(mmax=1, num_taps=-1, num_bands=2),
    "m2-8tap": dict(mmax=2, num_taps=-1),
    "mall": dict(lmax=3, mmax=3, num_taps=1),
    "m3-12tap": dict(lmax=4, mmax=3),
    "no-grid": dict(use_grid=False),
    "no-rotation": dict(edge_rotation=False),
    "one-resolution": dict(num_resolutions=1),
    "reduce-channels": dict(sphere_channels=12, sphere_channels_reduce=6),
    "sigmoid": dict(distance_function="sigmoid"),
    "linearsigmoid": dict(distance_function="linearsigmoid"),
    "silu-basis": dict(distance_function="silu"),
    "quadrature-output": dict(sphere_weighting="quadrature"),
    "conservative": dict(direct_forces=False),
    "lmax2": dict(lmax=2, mmax=1),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_trains(variant: str) -> None:
    """Forward + backward of every ablation of the paper (and our additions) is finite."""
    model = make_model(torch.float32, **VARIANTS[variant]).train()
    batch = AtomicBatch.from_atoms([small_slab(), molecule("CH3OH")])
    out = model(batch)
    assert out["energy"].shape == (2,) and out["forces"].shape == (batch.num_atoms, 3)
    loss = out["energy"].abs().mean() + out["forces"].norm(dim=1).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert torch.isfinite(out["energy"]).all() and torch.isfinite(out["forces"]).all()


def test_conservative_forces_are_minus_the_energy_gradient() -> None:
    model = make_model(direct_forces=False, mmax=1)
    atoms = small_slab()
    batch = AtomicBatch.from_atoms([atoms], dtype=torch.float64)
    forces = model(batch)["forces"].detach()
    h = 1e-5
    for atom, axis in [(0, 0), (5, 1), (11, 2), (7, 0)]:
        energies = []
        for sign in (1, -1):
            pos = batch.positions.clone()
            pos[atom, axis] += sign * h
            energies.append(model(replace(batch, positions=pos))["energy"].item())
        numeric = -(energies[0] - energies[1]) / (2 * h)
        assert abs(numeric - forces[atom, axis].item()) < 1e-6 * max(1.0, abs(numeric))


def test_conservative_forces_finite_for_edges_along_axes() -> None:
    """Edges exactly along +-x, +-y, +-z (the official code detaches frames for this)."""
    model = make_model(direct_forces=False, mmax=2)
    positions = [[0, 0, 0], [1.5, 0, 0], [0, 1.5, 0], [0, 0, 1.5], [-1.5, 0, 0], [0, -1.5, 0], [0, 0, -1.5]]
    atoms = Atoms("CO6", positions=positions)
    forces = model(AtomicBatch.from_atoms([atoms], dtype=torch.float64))["forces"]
    assert torch.isfinite(forces).all()
    # the central atom's neighbours are symmetric: the net force on it is small but defined
    assert forces.abs().max() > 0


def test_training_mode_rolls_randomly_eval_is_deterministic() -> None:
    model = make_model(mmax=1, num_taps=1)
    batch = AtomicBatch.from_atoms([small_slab()], dtype=torch.float64)
    with torch.no_grad():
        a, b = model(batch)["energy"], model(batch)["energy"]
        assert torch.equal(a, b)  # fixed roll
        model.train()
        c, d = model(batch)["energy"], model(batch)["energy"]
    assert not torch.allclose(c, d, atol=1e-9, rtol=0)


def test_batch_equals_each_structure_alone(structures: list[Atoms]) -> None:
    model = make_model()
    batch = AtomicBatch.from_atoms(structures[:4], dtype=torch.float64)
    together = model(batch)
    offset = 0
    for s, atoms in enumerate(structures[:4]):
        alone = model(AtomicBatch.from_atoms([atoms], dtype=torch.float64))
        torch.testing.assert_close(alone["energy"][0], together["energy"][s], atol=1e-9, rtol=1e-12)
        torch.testing.assert_close(alone["forces"], together["forces"][offset : offset + len(atoms)], atol=1e-9, rtol=0)
        offset += len(atoms)


def test_translation_wrapping_and_permutation(structures: list[Atoms]) -> None:
    model = make_model(mmax=1)
    atoms = structures[0]
    reference = model(AtomicBatch.from_atoms([atoms], dtype=torch.float64))
    moved = atoms.copy()
    moved.positions += np.array([0.7, -1.3, 2.1]) + atoms.cell[0] * 2 - atoms.cell[1]
    for variant in (moved, moved.copy()):
        out = model(AtomicBatch.from_atoms([variant], dtype=torch.float64))
        torch.testing.assert_close(out["energy"], reference["energy"], atol=1e-9, rtol=1e-12)
        torch.testing.assert_close(out["forces"], reference["forces"], atol=1e-9, rtol=0)
        variant.wrap()
    perm = np.random.default_rng(0).permutation(len(atoms))
    out = model(AtomicBatch.from_atoms([atoms[perm]], dtype=torch.float64))
    torch.testing.assert_close(out["energy"], reference["energy"], atol=1e-9, rtol=1e-12)
    torch.testing.assert_close(out["forces"], reference["forces"][perm], atol=1e-9, rtol=0)


def test_no_gradient_leaks_between_structures(structures: list[Atoms]) -> None:
    model = make_model(direct_forces=False)
    batch = AtomicBatch.from_atoms(structures[:2], dtype=torch.float64)
    positions = batch.positions.clone().requires_grad_(True)
    energy = model(replace(batch, positions=positions))["energy"]
    (grad,) = torch.autograd.grad(energy[0], positions)
    assert grad[: len(structures[0])].abs().max() > 0
    assert grad[len(structures[0]) :].abs().max() == 0


def test_isolated_atom_is_valid() -> None:
    model = make_model()
    batch = AtomicBatch.from_atoms([Atoms("Cu", positions=[[0, 0, 0]])], dtype=torch.float64)
    assert build_graph(batch, 8.0, 40).num_edges == 0
    out = model(batch)
    assert torch.isfinite(out["energy"]).all() and torch.isfinite(out["forces"]).all()
    conservative = make_model(direct_forces=False)(batch)
    assert torch.isfinite(conservative["energy"]).all()
    assert torch.equal(conservative["forces"], torch.zeros(1, 3, dtype=torch.float64))


def test_bad_input_raises_clear_errors() -> None:
    model = make_model()
    close = Atoms("CO", positions=[[0, 0, 0], [0, 0, 5e-5]])
    with pytest.raises(ValueError, match="apart"):
        model(AtomicBatch.from_atoms([close]))
    with pytest.raises(ValueError, match="element table"):
        model(AtomicBatch.from_atoms([Atoms("U", positions=[[0, 0, 0]])]))  # Z = 92 >= 90
    nan = molecule("H2O")
    nan.positions[1, 0] = np.nan
    with pytest.raises(ValueError, match="(?i)non-finite|nan"):
        AtomicBatch.from_atoms([nan])
    batch = AtomicBatch.from_atoms([molecule("H2O")])
    batch.positions[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        model(batch)
    singular = Atoms("Cu2", positions=[[0, 0, 0], [1.5, 1.5, 0]], cell=[[3, 0, 0], [6, 0, 0], [0, 0, 3]], pbc=True)
    with pytest.raises(ValueError, match="(?i)singular"):
        model(AtomicBatch.from_atoms([singular]))


def test_rotation_mad_ordered_as_in_table_4(structures: list[Atoms]) -> None:
    """Paper Table 4: m = 0 and 4-tap are far closer to equivariant than 1-tap m <= 1.

    Random (amplified) weights, float64, fixed roll; MADs relative to the mean output magnitude
    so that models with different output scales compare. 128 output points as in the paper:
    with few points the output block's own discretisation error hides the messages' one.
    """
    size = dict(num_sphere_samples=128, sphere_channels=16, sphere_channels_reduce=16, hidden_channels=32)
    batch = AtomicBatch.from_atoms(structures[:4], dtype=torch.float64)
    relative = {}
    for name, kwargs in {"m0": dict(mmax=0), "m1-1tap": dict(mmax=1, num_taps=1), "m1-4tap": dict(mmax=1)}.items():
        mad = rotation_mad(make_model(**size, **kwargs), batch, num_rotations=2)
        relative[name] = (
            mad["energy_mad"] / mad["energy_mean_abs"],
            mad["force_mad"] / mad["force_mean_abs"],
        )
    print({k: [f"{v:.2e}" for v in vals] for k, vals in relative.items()})
    for quantity in (0, 1):
        assert relative["m0"][quantity] < 0.25 * relative["m1-1tap"][quantity]
        assert relative["m1-4tap"][quantity] < 0.25 * relative["m1-1tap"][quantity]


def test_model_moves_between_dtypes_exactly() -> None:
    """Constants are rebuilt from float64 masters: float32 -> float64 loses nothing."""
    model = make_model(torch.float32)
    direct = make_model(torch.float64)
    batch = AtomicBatch.from_atoms([small_slab()], dtype=torch.float64)
    torch.testing.assert_close(model.double()(batch)["energy"], direct(batch)["energy"], atol=1e-10, rtol=0)


@pytest.mark.parametrize("method", ["vesin", "torch"])
def test_two_dimensional_slab_with_zero_third_vector(method: str) -> None:
    """A slab periodic in x and y only may have a zero c vector (valid ASE input): same graph
    and energy as the same slab with a vacuum c vector."""
    from spherical_channels.data.neighbors import build_graph

    model = make_model(cutoff=5.0)
    slab = small_slab()
    slab.pbc = [True, True, False]
    flat = slab.copy()
    flat.cell[2] = [0.0, 0.0, 0.0]
    a, b = (AtomicBatch.from_atoms([x], dtype=torch.float64) for x in (slab, flat))
    ga, gb = build_graph(a, 5.0, 40, method=method), build_graph(b, 5.0, 40, method=method)
    assert torch.equal(ga.edge_index, gb.edge_index) and torch.equal(ga.cell_offsets, gb.cell_offsets)
    assert (ga.cell_offsets[:, 2] == 0).all()
    torch.testing.assert_close(model(a)["energy"], model(b)["energy"], atol=1e-10, rtol=0)


@pytest.mark.parametrize("direct_forces", [True, False])
def test_mixed_precision_forward_and_backward(direct_forces: bool) -> None:
    """Under bf16 autocast (CPU) the message and grid networks run in bf16, geometry and sums in
    float32: outputs are float32, close to the float32 model's, not identical; gradients finite."""
    model = make_model(torch.float32, direct_forces=direct_forces).train()
    model.update_config(roll="fixed")  # same frames in both runs
    batch = AtomicBatch.from_atoms([small_slab(), molecule("CH3OH")])
    reference = model(batch)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = model(batch)
    assert out["energy"].dtype == torch.float32 and out["forces"].dtype == torch.float32
    scale = reference["energy"].abs().max()
    assert 0 < (out["energy"] - reference["energy"]).abs().max() < 0.05 * scale
    force_scale = reference["forces"].abs().max()
    assert (out["forces"] - reference["forces"]).abs().max() < 0.1 * force_scale
    loss = out["energy"].abs().sum() + out["forces"].norm(dim=1).sum()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)

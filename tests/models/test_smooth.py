"""The smooth SCN (envelope, no cap, blended resolutions and frames) and the ZBL prior."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import add_adsorbate, bulk, fcc111
from ase.io import read
from ase.optimize import FIRE
from scn_helpers import scale_like_fixtures

from spherical_channels.data.batch import AtomicBatch
from spherical_channels.models.checkpoint import CHECKPOINT_FORMAT, load_model, save_checkpoint
from spherical_channels.models.config import ConfigError, SCNConfig
from spherical_channels.models.repulsion import COULOMB, ZBLRepulsion
from spherical_channels.models.scn import SCN
from spherical_channels.models.smooth import polynomial_envelope, smoothstep
from spherical_channels.simulation.calculator import SCNCalculator

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(num_interactions=2, lmax=3, mmax=1, num_bands=2, sphere_channels=8, sphere_channels_reduce=8,
            hidden_channels=16, num_sphere_samples=16, num_basis_functions=8, basis_width_scalar=2.0,
            cutoff=5.0, max_num_neighbors=12)


def tiny_model(scale: bool = True, **changes) -> SCN:
    torch.manual_seed(0)
    model = SCN(**{**TINY, **changes}).double().eval()
    return scale_like_fixtures(model) if scale else model


def batch_of(frames: list[Atoms]) -> AtomicBatch:
    return AtomicBatch.from_atoms(frames, dtype=torch.float64)


# ---------------------------------------------------------------- ingredients


def test_envelope_and_smoothstep_vanish_to_second_order_at_their_ends() -> None:
    d = torch.tensor([0.0, 2.5, 5.0 - 1e-9, 5.0, 6.0], dtype=torch.float64, requires_grad=True)
    u = polynomial_envelope(d, 5.0, 5)
    (du,) = torch.autograd.grad(u.sum(), d, create_graph=True)
    (d2u,) = torch.autograd.grad(du.sum(), d)
    assert u[0] == 1.0 and 0 < u[1] < 1
    assert torch.all(u[2:].abs() < 1e-12) and torch.all(du[2:].abs() < 1e-9) and torch.all(d2u[2:].abs() < 1e-6)
    t = torch.tensor([-1.0, 0.0, 0.5, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    s = smoothstep(t)
    (ds,) = torch.autograd.grad(s.sum(), t)
    assert s.tolist() == [0.0, 0.0, 0.5, 1.0, 1.0] and ds[1] == 0 and ds[3] == 0


def test_smooth_options_are_validated_and_stored() -> None:
    with pytest.raises(ConfigError, match="resolution_distance"):
        SCNConfig(smooth=True, cutoff=3.0, resolution_distance=3.0)
    with pytest.raises(ConfigError, match="zbl_radius_scale"):
        SCNConfig(zbl=True, zbl_radius_scale=0.0)
    config = SCNConfig(smooth=True, zbl=True)
    assert SCNConfig.from_dict(config.to_dict()) == config
    assert SCNConfig().smooth is False and SCNConfig().zbl is False  # official checkpoints: off


def test_smooth_model_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    model = tiny_model(smooth=True, zbl=True, direct_forces=False).float()  # stored as trained: float32
    path = save_checkpoint({"format": CHECKPOINT_FORMAT, "model_config": model.config.to_dict(),
                            "state_dict": model.state_dict()}, tmp_path / "smooth.pt")
    loaded = load_model(path, dtype=torch.float64).eval()
    model = model.double()
    assert loaded.config == model.config
    slab = fcc111("Cu", (2, 2, 2), vacuum=5.0)
    add_adsorbate(slab, "O", 1.5, "fcc")
    a, b = model(batch_of([slab])), loaded(batch_of([slab]))
    torch.testing.assert_close(a["energy"], b["energy"], rtol=1e-12, atol=0)
    torch.testing.assert_close(a["forces"], b["forces"], rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- ZBL


def test_zbl_pair_energy_and_slope() -> None:
    zbl = ZBLRepulsion(90, radius_scale=0.6)
    r = torch.tensor([0.3, 0.5, 1.2], dtype=torch.float64, requires_grad=True)
    z = torch.tensor([8, 8, 8])
    cu = torch.tensor([29, 29, 29])
    value, slope = zbl.pair_energy(r, z, cu, slope=True)
    # by hand at 0.5 Å: a = 0.4685 / (8^0.23 + 29^0.23), phi(r / a), envelope at r / (0.6 (0.66 + 1.32))
    a = 0.46850 / (8**0.23 + 29**0.23)
    x = 0.5 / a
    phi = 0.18175 * np.exp(-3.19980 * x) + 0.50986 * np.exp(-0.94229 * x) + 0.28022 * np.exp(-0.40290 * x) + 0.02817 * np.exp(-0.20162 * x)
    y = 0.5 / (0.6 * (0.66 + 1.32))
    envelope = 1 - 21 * y**5 + 35 * y**6 - 15 * y**7
    assert float(value[1]) == pytest.approx(COULOMB * 8 * 29 / 0.5 * phi * envelope, rel=1e-12)
    assert float(value[1]) > 100.0  # strongly repulsive at 0.5 Å
    (autograd,) = torch.autograd.grad(value.sum(), r)
    torch.testing.assert_close(slope, autograd, rtol=1e-12, atol=0)
    assert value[2] == 0 and slope[2] == 0  # beyond 0.6 x (sum of covalent radii) = 1.19 Å


def test_direct_model_gets_the_zbl_forces() -> None:
    """Direct forces with the prior = the head's forces + the prior's -dE/dx (by autograd)."""
    with_zbl, without = tiny_model(zbl=True), tiny_model(zbl=False)
    slab = fcc111("Cu", (2, 2, 2), vacuum=5.0)
    add_adsorbate(slab, "O", 0.6, "ontop")  # 0.6 Å above a Cu atom: inside the prior's range
    batch = batch_of([slab])
    prior = with_zbl(batch)["forces"] - without(batch)["forces"]
    conservative = tiny_model(zbl=True, direct_forces=False)
    plain = tiny_model(zbl=False, direct_forces=False)
    expected = conservative(batch)["forces"] - plain(batch)["forces"]
    assert prior.abs().max() > 10.0
    torch.testing.assert_close(prior, expected, rtol=1e-9, atol=1e-9)


def test_a_relaxation_from_a_close_contact_separates_the_atoms() -> None:
    """An adsorbate atom 0.5 Å from a surface atom: the prior pushes it out; every pair of atoms
    ends more than 1 Å apart."""
    model = tiny_model(scale=False, smooth=True, zbl=True, direct_forces=False)
    slab = fcc111("Cu", (2, 2, 3), vacuum=6.0)
    add_adsorbate(slab, "O", 0.5, "ontop")
    slab.calc = SCNCalculator(model, dtype=torch.float64)
    FIRE(slab, logfile=None).run(fmax=0.05, steps=300)
    distances = slab.get_all_distances(mic=True)
    assert distances[np.triu_indices(len(slab), 1)].min() > 1.0


# ---------------------------------------------------------------- smoothness and ties


def _path_energies(model: SCN, atoms: Atoms, index: int, steps: int = 400, length: float = 1.0) -> np.ndarray:
    """Energies with atom ``index`` moved ``length`` Å along x in ``steps`` equal steps."""
    frames = []
    for t in np.linspace(0.0, length, steps + 1):
        moved = atoms.copy()
        moved.positions[index, 0] += t
        frames.append(moved)
    with torch.no_grad():
        return np.concatenate([
            model.energy_terms(b, b.positions, b.cell)["energy"].numpy()
            for b in (batch_of(frames[i : i + 50]) for i in range(0, len(frames), 50))
        ])


def test_smooth_energy_has_no_jumps_along_an_adsorbate_path() -> None:
    """An adsorbate atom moved 1 Å in 2.5 mÅ steps on built-in structures: no step above 5x the
    median step for the smooth variant; the official variant's jumps are far larger (measured
    on the same random weights: the test could fail)."""
    structures = [a for a in read(Path(__file__).resolve().parents[2] / "src/spherical_channels/resources/example_structures.extxyz", ":")
                  if 0 < list(a.get_tags()).count(2) < len(a)][:2]
    smooth, official = tiny_model(smooth=True), tiny_model()
    smooth_ratios, official_ratios = [], []
    for atoms in structures:
        index = int(np.flatnonzero(atoms.get_tags() == 2)[0])
        for model, ratios in ((smooth, smooth_ratios), (official, official_ratios)):
            steps = np.abs(np.diff(_path_energies(model, atoms, index)))
            ratios.append(steps.max() / np.median(steps))
    print("step ratio, smooth:", smooth_ratios, "official:", official_ratios)
    assert max(smooth_ratios) <= 5.0, smooth_ratios
    assert max(official_ratios) > 20.0, official_ratios


@pytest.mark.parametrize("kind", ["bulk_fcc", "symmetric_slab"])
def test_smooth_variant_is_permutation_invariant_with_equidistant_neighbours(kind: str) -> None:
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2)) if kind == "bulk_fcc" else fcc111("Pt", (3, 3, 4), vacuum=6.0)
    order = np.random.default_rng(1).permutation(len(atoms))
    for model in (tiny_model(smooth=True), tiny_model(smooth=True, direct_forces=False)):
        a, b = model(batch_of([atoms])), model(batch_of([atoms[order]]))
        scale_e = float(a["energy"].abs().max())
        scale_f = float(a["forces"].abs().max()) + 1.0
        assert float((a["energy"] - b["energy"]).abs().max()) <= 1e-10 * scale_e
        assert float((a["forces"][order] - b["forces"]).abs().max()) <= 1e-10 * scale_f


@pytest.mark.parametrize(
    "changes",
    [dict(mmax=0), dict(mmax=2), dict(num_taps=1), dict(use_grid=False), dict(num_bands=1), dict(num_resolutions=1),
     dict(edge_rotation=False)],
    ids=["m0", "m2", "one_tap", "no_grid", "one_band", "one_resolution", "no_rotation"],
)
def test_every_scn_ingredient_works_in_the_smooth_variant(changes: dict) -> None:
    """Forces are -dE/dx (central differences) and atom order does not matter, whatever the
    ablation."""
    model = tiny_model(smooth=True, zbl=True, direct_forces=False, **changes)
    slab = fcc111("Cu", (2, 2, 2), vacuum=5.0)
    add_adsorbate(slab, "O", 1.2, "bridge")
    out = model(batch_of([slab]))
    h, index = 1e-5, len(slab) - 1
    energies = []
    for sign in (1.0, -1.0):
        moved = slab.copy()
        moved.positions[index, 2] += sign * h
        energies.append(float(model(batch_of([moved]))["energy"]))
    numerical = -(energies[0] - energies[1]) / (2 * h)
    assert abs(numerical - float(out["forces"][index, 2])) <= 1e-6 * (1.0 + float(out["forces"].abs().max()))
    order = np.random.default_rng(0).permutation(len(slab))
    permuted = model(batch_of([slab[order]]))
    assert abs(float(permuted["energy"] - out["energy"])) <= 1e-10 * abs(float(out["energy"]))

"""SchNet: equivalence with the official OC20 SchNet (fairchem-core 1.10 ``SchNetWrap``, fixture
``tests/fixtures/schnet_tiny``), its properties, checkpoints and the model registry (training
and the commands: ``tests/training/test_schnet_training.py``).

Tolerances against the fixture: float32 |dE| <= 1e-4 eV + 1e-5 |E| and every force component
within 1e-4 eV/A, as the fixtures state (the official float32 and float64 runs differ by 7.7e-6
eV and 5.0e-6 eV/A). float64: the official run adds lattice offsets computed in float32
(``n.float() @ cell.float()``) to float64 positions, so its edge vectors are off exact ones by up
to 4.8e-7 A. Fed those same vectors this implementation agrees to double rounding; on its own
exact vectors the outputs differ by what the vectors' error makes of them (measured 1.1e-7 eV,
8.8e-7 eV/A).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from spherical_channels.data.batch import AtomicBatch
from spherical_channels.models import SchNet
from spherical_channels.models import registry
from spherical_channels.models.checkpoint import (
    CheckpointError,
    load_model,
    model_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from spherical_channels.models.config import ConfigError
from spherical_channels.models.fairchem_schnet import official_schnet_key
from spherical_channels.models.schnet_config import OFFICIAL_MAX_NEIGHBORS, SchNetConfig
from spherical_channels.simulation import SCNCalculator
from spherical_channels.testing import Expectations, default_structures, pytest_properties, run_property_suite

from scn_helpers import batch_from_preds

pytestmark = pytest.mark.usefixtures("one_thread")

HERE = Path(__file__).resolve().parent
FIXTURE = HERE.parent / "fixtures" / "schnet_tiny"
CKPT = FIXTURE / "ckpt.pt"
CONFIGS = HERE.parents[1] / "configs" / "small"
TINY = dict(hidden_channels=16, num_filters=16, num_interactions=2, num_gaussians=16, cutoff=5.0)


def official_edges(preds: np.lib.npyio.NpzFile) -> torch.Tensor:
    """The official graph's ``edge_index`` [2, E] with batch-global atom indices."""
    natoms, nedges = preds["natoms"], preds["nedges"]
    return torch.as_tensor(preds["edge_index"] + np.repeat(np.cumsum(natoms) - natoms, nedges))


def outputs_on_vectors(model: SchNet, batch: AtomicBatch, edge_index: torch.Tensor, vectors: np.ndarray):
    """Energy [S] and forces -dE/dx [N, 3] of ``model`` on given edge vectors (j -> i)."""
    vec = torch.as_tensor(vectors, dtype=batch.positions.dtype).requires_grad_(True)
    energy = model.energy_from_distances(batch, edge_index, torch.linalg.vector_norm(vec, dim=-1))
    (grad,) = torch.autograd.grad(energy.sum(), vec)
    # vec = x_j - x_i + n.cell: dE/dx_j = +dE/dvec, dE/dx_i = -dE/dvec
    gradient = torch.zeros_like(batch.positions).index_add(0, edge_index[0], grad).index_add(0, edge_index[1], -grad)
    return energy.detach().numpy(), -gradient.numpy()


def small_schnet(**changes) -> SchNet:
    """configs/small/schnet.yaml's model, shrunk (16 features and filters, 2 interactions), with
    random biases (the official init sets them to zero: the energy would hardly depend on them)."""
    options = yaml.safe_load((CONFIGS / "schnet.yaml").read_text())["model"]
    torch.manual_seed(0)
    model = SchNet(**{**options, "hidden_channels": 16, "num_filters": 16, "num_interactions": 2, **changes})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.uniform_(-0.5, 0.5)
    return model


# ---------------------------------------------------------------- the official fixture


def test_official_checkpoint_loads_as_a_schnet_with_its_normalisers() -> None:
    checkpoint = read_checkpoint(CKPT)
    assert checkpoint["config"]["model"] == "schnet" and checkpoint["ema"] is None
    model = load_model(CKPT)
    assert isinstance(model, SchNet) and not model.training
    assert model.config == SchNetConfig.from_official(json.loads((FIXTURE / "config.json").read_text()))
    assert model.config.neighbor_cap == OFFICIAL_MAX_NEIGHBORS == 50  # hard-coded, not in the config
    assert model.num_params == 9313  # the fixture README's count (the shared filter nets once)
    assert float(model.energy_scale) == pytest.approx(2.887317180633545)
    assert float(model.energy_shift) == pytest.approx(-0.7554450631141663)
    assert SchNet.from_fairchem(str(CKPT)).config == model.config
    with pytest.raises(CheckpointError, match="not SchNet"):
        SchNet.from_fairchem(str(HERE.parent / "fixtures" / "cfg_m0" / "ckpt.pt"))


def test_energies_and_forces_float32() -> None:
    preds = np.load(FIXTURE / "preds.npz")
    out = load_model(CKPT)(batch_from_preds(preds, torch.float32))
    energy, forces = out["energy"].numpy().astype(np.float64), out["forces"].numpy().astype(np.float64)
    ref_e, ref_f = preds["energy"].astype(np.float64), preds["forces"].astype(np.float64)
    print(f"float32: max |dE| = {np.abs(energy - ref_e).max():.1e} eV, max |dF| = {np.abs(forces - ref_f).max():.1e} eV/A")
    assert np.all(np.abs(energy - ref_e) <= 1e-4 + 1e-5 * np.abs(ref_e)), (energy, ref_e)
    assert np.max(np.abs(forces - ref_f)) <= 1e-4
    # O(1) outputs, de-normalised (std 2.89, mean -0.76): a convention error could not hide
    assert np.max(np.abs(ref_f)) > 0.5 and np.ptp(ref_e) > 10
    assert not np.allclose(ref_e, preds["energy_raw"])


def test_the_graph_is_the_official_one() -> None:
    """Same edges (j, i, n); the 24 edges kept at the 50-neighbour cap among exactly tied
    periodic self-images (``edge_cap_tie``) are compared without their offsets: which of the
    tied images the official code keeps is arbitrary."""
    from spherical_channels.data.neighbors import edge_vectors

    preds = np.load(FIXTURE / "preds.npz")
    model = load_model(CKPT)
    batch = batch_from_preds(preds, torch.float32)
    graph = model.build_graph(batch)
    ref_index, ref_ties = official_edges(preds).numpy(), preds["edge_cap_tie"]
    assert ref_ties.sum() == 24 and np.all(ref_index[0, ref_ties] == ref_index[1, ref_ties])  # self-images only
    tie_length = dict(zip(ref_index[1, ref_ties].tolist(), preds["edge_distance"][ref_ties].tolist()))

    index, offsets = graph.edge_index.numpy(), graph.cell_offsets.numpy()
    length = np.linalg.norm(edge_vectors(batch.positions, batch.cell, batch.batch, graph).numpy(), axis=1)
    ties = np.array([j == i and abs(d - tie_length.get(i, -1.0)) < 1e-4 for (j, i), d in zip(index.T, length)])
    assert ties.sum() == 24  # as many of the tied images kept as officially, each centre

    def keys(index: np.ndarray, offsets: np.ndarray, tie: np.ndarray) -> list[tuple]:
        return sorted((int(j), int(i), *((0, 0, 0) if t else map(int, n))) for j, i, n, t in zip(*index, offsets, tie))

    assert keys(index, offsets, ties) == keys(ref_index, preds["cell_offsets"], ref_ties)
    assert np.bincount(index[1]).max() == 50


def test_energies_and_forces_float64() -> None:
    preds = np.load(FIXTURE / "preds_float64.npz")
    model = load_model(CKPT, dtype=torch.float64)
    batch = batch_from_preds(preds, torch.float64)
    edge_index = official_edges(preds)

    # The official vectors: double rounding only (sums of ~50 O(1) terms per atom: ~1e-14).
    energy, forces = outputs_on_vectors(model, batch, edge_index, preds["edge_distance_vec"])
    d_energy, d_forces = np.abs(energy - preds["energy"]).max(), np.abs(forces - preds["forces"]).max()
    print(f"float64, official edge vectors: max |dE| = {d_energy:.1e} eV, max |dF| = {d_forces:.1e} eV/A")
    assert d_energy < 1e-12 and d_forces < 1e-12

    # The official vectors are off by float32 rounding of n.cell (|n.cell| < 16 A: <= 2^-21 A
    # per component); ours are exact.
    natoms, nedges = preds["natoms"], preds["nedges"]
    cell = preds["cell"].astype(np.float64)[np.repeat(np.arange(len(natoms)), nedges)]
    exact = (preds["positions"][edge_index[0]] - preds["positions"][edge_index[1]]) + np.einsum(
        "ek,ekc->ec", preds["cell_offsets"].astype(np.float64), cell
    )
    vector_error = np.abs(exact - preds["edge_distance_vec"]).max()
    assert 0 < vector_error <= 2.0**-21

    # Own graph: the outputs move by the vectors' error times the energy's first and second
    # derivatives (|dE/dd| ~ 1-10 eV/A over ~50 edges; force curvature ~10 eV/A^2): the bounds
    # allow ~2x the measured 1.1e-7 eV and 8.8e-7 eV/A.
    out = model(batch)
    d_energy = np.abs(out["energy"].numpy() - preds["energy"]).max()
    d_forces = np.abs(out["forces"].numpy() - preds["forces"]).max()
    print(f"float64, own graph: max |dE| = {d_energy:.1e} eV, max |dF| = {d_forces:.1e} eV/A")
    assert d_energy < 3e-7 and d_forces < 2e-6


def test_float64_uses_the_checkpoints_float32_gaussian_centres() -> None:
    """The official float64 model computes its Gaussian width from a float64 linspace but
    evaluates the centres the checkpoint stores, float32: exact float64 centres would move
    the energies by ~4e-6 eV, a float32 width by ~2e-7 eV."""
    preds = np.load(FIXTURE / "preds_float64.npz")
    batch, edge_index = batch_from_preds(preds, torch.float64), official_edges(preds)
    model = load_model(CKPT, dtype=torch.float64)
    stored = read_checkpoint(CKPT)["state_dict"]["module.distance_expansion.offset"]
    assert stored.dtype == torch.float32 and torch.equal(model.distance_expansion.offset, stored.double())
    with torch.no_grad():
        model.distance_expansion.offset.copy_(torch.linspace(0.0, 6.0, 24, dtype=torch.float64))
    energy, _ = outputs_on_vectors(model, batch, edge_index, preds["edge_distance_vec"])
    assert np.abs(energy - preds["energy"]).max() > 1e-6


def test_ema_weights_are_used_in_the_official_parameter_order() -> None:
    """The fixture has no EMA (its config has none); an EMA in the official layout (tensors in
    ``parameters()`` order: the filter nets once, no buffers) is what a loader must then use."""
    checkpoint = read_checkpoint(CKPT)
    official = checkpoint["state_dict"]
    order = [k for k in official if ".conv.nn." not in k and not k.endswith("distance_expansion.offset")]
    checkpoint["ema"] = {"decay": 0.999, "num_updates": 7, "collected_params": [],
                         "shadow_params": [official[k] * (1.0 + 0.01 * n) for n, k in enumerate(order)]}
    ema = load_model(checkpoint).state_dict()
    raw = load_model(checkpoint, weights="raw").state_dict()
    for n, key in enumerate(order):
        native = official_schnet_key(key)
        assert torch.equal(ema[native], official[key] * (1.0 + 0.01 * n)), key
        assert torch.equal(raw[native], official[key]), key
    del checkpoint["ema"]["shadow_params"][-1]
    with pytest.raises(CheckpointError, match="EMA has 22 tensors but the state dict 23 parameters"):
        load_model(checkpoint)


def test_inconsistent_official_checkpoints_are_refused() -> None:
    checkpoint = read_checkpoint(CKPT)
    shared = copy.deepcopy(checkpoint)
    shared["state_dict"]["module.interactions.1.conv.nn.2.bias"] += 1.0
    with pytest.raises(CheckpointError, match=r"interactions\.1\.conv\.nn\.2\.bias.* one filter network under both names"):
        load_model(shared)
    scales = copy.deepcopy(checkpoint)
    scales["normalizers"]["grad_target"]["std"] = torch.tensor(1.5)
    with pytest.raises(CheckpointError, match="scale energies by 2.887.* but forces by 1.5"):
        load_model(scales)
    unknown = copy.deepcopy(checkpoint)
    unknown["state_dict"]["module.atomref.weight"] = torch.zeros(100, 1)
    with pytest.raises(CheckpointError, match="unrecognised key 'atomref.weight'"):
        load_model(unknown)
    shapes = copy.deepcopy(checkpoint)
    shapes["config"]["model_attributes"]["num_filters"] = 8
    with pytest.raises(CheckpointError, match="weights do not fit"):
        load_model(shapes)
    newer = copy.deepcopy(checkpoint)  # fairchem >= 1 layout: config["model"] = {"name": ..., ...}
    newer["config"]["model"] = {"name": "schnet", **newer["config"].pop("model_attributes")}
    assert isinstance(load_model(newer), SchNet)


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_gaussians": 1}, "num_gaussians must be >= 2"),
        ({"cutoff": 0}, "cutoff must be > 0"),
        ({"hidden_channels": 1}, "hidden_channels must be >= 2"),
        ({"readout": "max"}, r"readout must be one of \['add', 'sum', 'mean'\]"),
        ({"num_filters": 2.5}, "num_filters must be an integer"),
        ({"neighbor_ties": "any"}, "neighbor_ties must be one of"),
    ],
)
def test_invalid_options_are_refused_by_name(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SchNetConfig(**changes)


def test_official_attributes_convert_and_round_trip() -> None:
    official = {"num_atoms": 0, "bond_feat_dim": 50, "num_targets": 1, "name": "schnet", "cutoff": 6, "readout": "add"}
    config = SchNetConfig.from_official(official)
    assert config.cutoff == 6.0 and isinstance(config.cutoff, float) and config.hidden_channels == 128
    assert SchNetConfig.from_dict(config.to_dict()) == config and config.replace(num_filters=8).num_filters == 8
    with pytest.raises(ConfigError, match="not SchNet"):
        SchNetConfig.from_official({"name": "scn"})
    with pytest.raises(ConfigError, match=r"unknown SchNet options \['lmax'\]"):
        SchNetConfig.from_dict({"lmax": 3})
    model = SchNet(**TINY)
    assert model.cutoff == 5.0 and model.conservative and model.config.max_num_elements == 100
    with pytest.raises(AttributeError, match="frozen configuration"):
        model.cutoff = 6.0


def test_mean_readout_averages_and_normalisation_applies() -> None:
    atoms = [s.atoms for s in default_structures()[:2]]
    batch = AtomicBatch.from_atoms(atoms, dtype=torch.float64)
    torch.manual_seed(0)
    add = SchNet(**TINY).double().eval()
    mean = SchNet(SchNetConfig(**TINY, readout="mean")).double().eval()
    mean.load_state_dict(add.state_dict())
    e_add, e_mean = add(batch)["energy"], mean(batch)["energy"]
    torch.testing.assert_close(e_mean, e_add / batch.natoms.double(), rtol=1e-14, atol=1e-14)
    reference = {int(z): 0.1 * int(z) for z in batch.atomic_numbers.unique()}
    add.set_normalization(energy_scale=2.0, energy_shift=-1.0, element_energies=reference)
    refs = torch.zeros(2, dtype=torch.float64).index_add(0, batch.batch, 0.1 * batch.atomic_numbers.double())
    out = add(batch)
    torch.testing.assert_close(out["energy"], 2.0 * e_add - 1.0 + refs, rtol=1e-14, atol=1e-12)
    with pytest.raises(ValueError, match="force_scale .* must equal energy_scale"):
        add.set_normalization(energy_scale=2.0, force_scale=1.0)


def test_use_pbc_false_ignores_the_cells() -> None:
    slab = default_structures()[0].atoms
    molecule = slab.copy()
    molecule.pbc = False
    torch.manual_seed(0)
    periodic = SchNet(**TINY).double().eval()
    vacuum = SchNet(SchNetConfig(**TINY, use_pbc=False)).double().eval()
    vacuum.load_state_dict(periodic.state_dict())
    batch = AtomicBatch.from_atoms([slab], dtype=torch.float64)
    a = vacuum(batch)
    b = periodic(AtomicBatch.from_atoms([molecule], dtype=torch.float64))
    torch.testing.assert_close(a["energy"], b["energy"], rtol=1e-14, atol=1e-12)
    torch.testing.assert_close(a["forces"], b["forces"], rtol=1e-14, atol=1e-12)
    # a periodic graph built by cutoff and cap alone (the trainer's collate) is not used
    c = vacuum(batch, graph=periodic.build_graph(batch))
    assert torch.equal(c["energy"], a["energy"]) and torch.equal(c["forces"], a["forces"])


# ---------------------------------------------------------------- properties

#: With the shell tie rule SchNet is exact everywhere: a function of distances (rotation exact to
#: round-off), smooth in them (cosine cutoff), its cap taken whole shell by shell.
test_schnet_properties = pytest_properties(
    lambda: small_schnet(neighbor_ties="shell"), expectations=Expectations(), smoothness_steps=8, num_rotations=2
)


def test_official_tie_rule_breaks_only_supercell_forces() -> None:
    """The official 50-neighbour cap cuts a shell of tied distances on the rattled bulk cell (atom
    0's 50th and 51st neighbours are its own images at +n and -n). Its energy cannot tell which
    one is kept, nor can its forces in the cell (a self-image edge has a fixed length); in the
    2x2x1 supercell the two images are other atoms, and the edge kept pulls on both. Everything
    else stays exact."""
    report = run_property_suite(
        small_schnet(), expectations=Expectations(overrides={"supercell": None}), smoothness_steps=8, num_rotations=2
    )
    print(report.table())
    assert report.passed, report.table()
    for dtype, rounding in (("float32", 1e-5), ("float64", 1e-13)):
        assert report.get("rotation_energy", dtype).status == "pass"  # exact, not a bound
        supercell = report.get("supercell", dtype).details
        assert supercell["energy_relative"] < rounding
        per_structure = supercell["structures"]
        assert per_structure["bulk"]["forces_abs"] > 0.01
        assert all(v["forces_abs"] < rounding * 100 for k, v in per_structure.items() if k != "bulk")


# ---------------------------------------------------------------- checkpoints and the registry


def test_package_checkpoint_round_trip(tmp_path: Path) -> None:
    model = small_schnet(readout="mean").double()
    model.set_normalization(energy_scale=1.5, energy_shift=0.25, element_energies={8: -4.0, 29: -3.0})
    path = save_checkpoint(model_checkpoint(model, statistics={"element_energies": {"8": -4.0}}), tmp_path / "schnet.pt")
    raw = read_checkpoint(path)
    assert raw["model_name"] == "schnet" and raw["model_config"] == model.config.to_dict()
    again = load_model(path, dtype=torch.float64)
    assert isinstance(again, SchNet) and again.config == model.config
    batch = AtomicBatch.from_atoms([s.atoms for s in default_structures()[:2]], dtype=torch.float64)  # periodic
    expected, got = model.eval()(batch, stress=True), again(batch, stress=True)
    for key in ("energy", "forces", "stress"):
        assert torch.equal(expected[key], got[key]), key
    changed = load_model(path, regress_forces=False)
    assert "forces" not in changed(AtomicBatch.from_atoms([default_structures()[0].atoms]))


def test_registry_names_builds_and_recognises_every_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert {"scn", "schnet"} <= set(registry.model_names())
    assert registry.model_spec("SchNet").model_class is SchNet and registry.model_spec("scn").config_class.__name__ == "SCNConfig"
    assert registry.official_spec("spherical_channel_network").name == "scn" and registry.official_spec(None).name == "scn"
    assert registry.spec_of(SchNet(**TINY)).name == "schnet"
    assert isinstance(registry.build_model("schnet", {"name": "schnet", **TINY}), SchNet)
    assert registry.model_spec("schnet").new_model_defaults == {}  # SCN's zbl prior is SCN's own
    with pytest.raises(ConfigError, match=r"unknown model 'dimenet'; this package implements scn, schnet"):
        registry.model_spec("dimenet")
    with pytest.raises(ValueError, match="registered already"):
        registry.register_model(registry.ModelSpec("schnet2", SchNet, SchNetConfig, lambda *a, **k: None, ("schnet",)))

    # a further model is one entry: then configurations, checkpoints and the trainer know it
    class Toy(SchNet):
        pass

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register_model(registry.ModelSpec("toy", Toy, SchNetConfig, registry.model_spec("schnet").convert_official,
                                               ("toy_official",)))
    assert registry.official_spec("toy_official").model_class is Toy
    path = save_checkpoint(model_checkpoint(Toy(**TINY)), tmp_path / "toy.pt")
    assert type(load_model(path)) is Toy
    from spherical_channels.training.config import TrainConfig

    config = TrainConfig.from_dict({"model": {"name": "toy", **TINY}, "optim": {"max_steps": 1}, "dataset": {"train": "x"}})
    assert config.model_name == "toy" and config.to_dict()["model"]["name"] == "toy"


def test_the_calculator_gives_a_schnets_stress() -> None:
    """The ASE calculator takes a SchNet: forces -dE/dx and stress (energy-conserving). A cell
    large enough that no atom's own images lie within the cutoff: in a 4-atom fcc cell the cap
    would cut a shell of self-images, whose order a strain changes (a kink in the energy)."""
    from ase.build import bulk

    model = small_schnet()
    atoms = bulk("Cu", "fcc", a=3.7, cubic=True).repeat(2)
    atoms.rattle(0.05, seed=0)
    atoms.calc = SCNCalculator(model, dtype=torch.float64)
    stress = atoms.get_stress()
    h = 1e-6  # central difference of the energy under a uniform strain: -V sigma_xx
    cell = atoms.cell.array.copy()
    energies = []
    for sign in (1, -1):
        strained = atoms.copy()
        strained.set_cell(cell @ np.diag([1 + sign * h, 1, 1]), scale_atoms=True)
        strained.calc = SCNCalculator(model, dtype=torch.float64)
        energies.append(strained.get_potential_energy())
    assert stress[0] == pytest.approx((energies[0] - energies[1]) / (2 * h) / atoms.get_volume(), rel=1e-6, abs=1e-9)


def test_the_shipped_schnet_config_builds() -> None:
    from spherical_channels.training.config import load_config

    config = load_config(CONFIGS / "schnet.yaml")
    assert config.model_name == "schnet" and config.train.path.endswith("train.extxyz")
    model = registry.model_spec(config.model_name).build(config.model)
    assert isinstance(model, SchNet) and model.config.num_interactions in range(3, 7)
    assert model.config.hidden_channels == 128 and model.config.cutoff == 6.0 and model.config.num_gaussians == 50


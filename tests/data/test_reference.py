"""Built-in EMT reference data: layout, labels, splits, sanity filter, determinism."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ase
import ase.io
import numpy as np
import pytest
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.data import covalent_radii

from spherical_channels.data.reference import (
    ADSORBATES,
    CATALYSTS,
    HELD_OUT_ADSORBATES,
    HELD_OUT_CATALYSTS,
    IN_DOMAIN_ADSORBATES,
    IN_DOMAIN_CATALYSTS,
    RELAX_FMAX,
    SIZES,
    SPLITS,
    GenerationReport,
    build_slab,
    drop_reason,
    generate_reference_data,
    is_broken,
    is_desorbed,
    place_adsorbate,
)
from spherical_channels.data.reference.catalysts import VACUUM

OOD_ADS_SPLITS = ("test_ood_ads", "test_ood_both")
OOD_CAT_SPLITS = ("test_ood_cat", "test_ood_both")
# The files hold exact floats (the package's extxyz writer), so EMT re-evaluated on the
# positions read back reproduces the stored labels up to summation-order rounding (~1e-13
# for these ~30-atom slabs); 1e-10 leaves room for that and nothing else.
FORCE_ATOL = 1e-10
ENERGY_ATOL = 1e-10
# Frames per split whose labels are re-evaluated with EMT.
NUM_CHECKED = 3
# H starts 1.35 bond lengths out (EMT's preference); bent species, whose side atoms keep
# a clearance, up to ~1.3.
MAX_START_BOND_RATIO = 1.4


def _read(path: Path) -> list[ase.Atoms]:
    return ase.io.read(path, index=":", format="extxyz")


def _fixed_indices(atoms: ase.Atoms) -> np.ndarray:
    fixed = [c for c in atoms.constraints if isinstance(c, FixAtoms)]
    assert len(fixed) == 1, f"{atoms.info.get('system_id')}: expected one FixAtoms, got {atoms.constraints}"
    return np.sort(fixed[0].get_indices())


def _emt(atoms: ase.Atoms) -> tuple[float, np.ndarray]:
    atoms = atoms.copy()
    atoms.calc = EMT()
    return atoms.get_potential_energy(), atoms.get_forces(apply_constraint=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, GenerationReport]:
    out = tmp_path_factory.mktemp("reference") / "tiny"
    report = generate_reference_data(out, size="tiny", seed=0, progress=False)
    return out, report


@pytest.fixture(scope="module")
def metadata(tiny) -> dict:
    return json.loads((tiny[0] / "metadata.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def frames(tiny) -> dict[str, dict[str, list[ase.Atoms]]]:
    out = tiny[0]
    return {kind: {split: _read(out / kind / f"{split}.extxyz") for split in SPLITS} for kind in ("s2ef", "is2re")}


def _all(frames: dict, kind: str | None = None) -> list[ase.Atoms]:
    kinds = (kind,) if kind else ("s2ef", "is2re")
    return [a for k in kinds for split in SPLITS for a in frames[k][split]]


# ----------------------------------------------------------------------------- layout and counts
def test_layout_and_counts(tiny, metadata, frames):
    out, report = tiny
    assert metadata["generator"] == "spherical_channels.data.reference"
    assert metadata["seed"] == 0 and metadata["size"] == "tiny"
    assert metadata["energy"] == "EMT total energy"
    assert metadata["units"] == {"energy": "eV", "forces": "eV/Å", "length": "Å"}
    assert list(metadata["splits"]) == list(SPLITS)
    for split in SPLITS:
        entry = metadata["splits"][split]
        assert (out / entry["s2ef"]).is_file() and (out / entry["is2re"]).is_file()
        assert entry["s2ef"] == f"s2ef/{split}.extxyz" and entry["is2re"] == f"is2re/{split}.extxyz"
        s2ef, is2re = frames["s2ef"][split], frames["is2re"][split]
        assert entry["num_frames"] == len(s2ef) == report.num_frames[split]
        assert entry["num_systems"] == len(is2re) == report.num_systems[split] == SIZES["tiny"].systems[split]
        config = SIZES["tiny"]
        types = [a.info["frame_type"] for a in s2ef]
        assert types.count("rattled") == config.rattles_per_system * len(is2re)
        assert report.frame_types[split] == entry["frame_types"] == {
            "relaxation": types.count("relaxation"),
            "rattled": types.count("rattled"),
        }
        assert entry["adsorbates"] == sorted({a.info["adsorbate"] for a in is2re})
        assert entry["catalysts"] == sorted({a.info["catalyst"] for a in is2re})
        assert report.s2ef_paths[split] == out / entry["s2ef"]
    assert report.dropped == metadata["dropped"]
    assert report.attempts == metadata["attempts"] == sum(report.num_systems.values()) + sum(report.dropped.values())
    assert set(metadata["timings"]) >= {"total_s"}


def test_report_dict_and_summary(tiny):
    _, report = tiny
    as_dict = json.loads(json.dumps(report.to_dict()))
    assert as_dict["num_systems"] == report.num_systems and as_dict["size"] == "tiny"
    text = report.summary()
    assert all(split in text for split in SPLITS) and "dropped" in text


# ----------------------------------------------------------------------------- labels
def test_labels_present_and_finite(frames):
    for atoms in _all(frames):
        energy = atoms.get_potential_energy()
        forces = atoms.calc.results["forces"]
        assert np.isfinite(energy)
        assert forces.shape == (len(atoms), 3) and np.isfinite(forces).all()


def test_labels_match_fresh_emt(frames):
    for kind in ("s2ef", "is2re"):
        for split in SPLITS:
            for atoms in frames[kind][split][:NUM_CHECKED]:
                energy, forces = _emt(atoms)
                assert atoms.get_potential_energy() == pytest.approx(energy, abs=ENERGY_ATOL)
                # Stored forces are unconstrained: fixed atoms keep their EMT forces.
                np.testing.assert_allclose(atoms.calc.results["forces"], forces, atol=FORCE_ATOL)


def test_both_frame_types_and_several_steps(frames):
    s2ef = _all(frames, "s2ef")
    relax = [a for a in s2ef if a.info["frame_type"] == "relaxation"]
    rattled = [a for a in s2ef if a.info["frame_type"] == "rattled"]
    assert relax and rattled and len(relax) + len(rattled) == len(s2ef)
    assert all(isinstance(a.info["relaxation_step"], (int, np.integer)) for a in relax)
    # Frames come from along the trajectories, not only their ends.
    assert len({int(a.info["relaxation_step"]) for a in relax}) > 2


# ----------------------------------------------------------------------------- structure
def test_tags_constraints_and_info(frames):
    for kind in ("s2ef", "is2re"):
        for split in SPLITS:
            for atoms in frames[kind][split]:
                tags = atoms.get_tags()
                assert set(np.unique(tags)) == {0, 1, 2}
                np.testing.assert_array_equal(_fixed_indices(atoms), np.flatnonzero(tags == 0))
                assert atoms.pbc.all()
                template = ADSORBATES[atoms.info["adsorbate"]]
                assert atoms[tags == 2].get_chemical_symbols() == template.atoms().get_chemical_symbols()
                info = atoms.info
                assert info["split"] == split and info["system_id"].startswith(split)
                assert info["facet"] in ("111", "100", "211")
                assert info["catalyst"] in CATALYSTS
                slab_elements = set(atoms[tags != 2].get_chemical_symbols())
                assert slab_elements <= set(CATALYSTS[info["catalyst"]].elements)
                expected_types = ("initial",) if kind == "is2re" else ("relaxation", "rattled")
                assert info["frame_type"] in expected_types


def test_fixed_atoms_do_not_move_within_a_system(frames):
    initial = {a.info["system_id"]: a for a in _all(frames, "is2re")}
    for atoms in _all(frames, "s2ef"):
        start = initial[atoms.info["system_id"]]
        fixed = atoms.get_tags() == 0
        np.testing.assert_allclose(atoms.positions[fixed], start.positions[fixed], atol=1e-7)


def test_vacuum_along_z(frames):
    for atoms in _all(frames, "is2re"):
        z = atoms.positions[:, 2]
        gap = atoms.cell[2, 2] - (z.max() - z.min())
        assert gap > VACUUM


# ----------------------------------------------------------------------------- splits
def test_system_ids_unique_and_disjoint(frames):
    seen: dict[str, str] = {}
    for split in SPLITS:
        ids = [a.info["system_id"] for a in frames["is2re"][split]]
        assert len(ids) == len(set(ids))
        assert {a.info["system_id"] for a in frames["s2ef"][split]} == set(ids)
        for system_id in ids:
            assert system_id not in seen, f"{system_id} in {seen.get(system_id)} and {split}"
            seen[system_id] = split


def test_domains_of_splits(frames, metadata):
    assert metadata["held_out"] == {"adsorbates": list(HELD_OUT_ADSORBATES), "catalysts": list(HELD_OUT_CATALYSTS)}
    assert not set(HELD_OUT_ADSORBATES) & set(IN_DOMAIN_ADSORBATES)
    assert not set(HELD_OUT_CATALYSTS) & set(IN_DOMAIN_CATALYSTS)
    for split in SPLITS:
        ads_pool = HELD_OUT_ADSORBATES if split in OOD_ADS_SPLITS else IN_DOMAIN_ADSORBATES
        cat_pool = HELD_OUT_CATALYSTS if split in OOD_CAT_SPLITS else IN_DOMAIN_CATALYSTS
        for atoms in frames["s2ef"][split] + frames["is2re"][split]:
            assert atoms.info["adsorbate"] in ads_pool, (split, atoms.info["adsorbate"])
            assert atoms.info["catalyst"] in cat_pool, (split, atoms.info["catalyst"])


def test_held_out_elements_seen_in_domain():
    in_domain = {e for c in IN_DOMAIN_CATALYSTS for e in CATALYSTS[c].elements}
    in_domain |= {s for a in IN_DOMAIN_ADSORBATES for s in ADSORBATES[a].atoms().get_chemical_symbols()}
    for name in HELD_OUT_CATALYSTS:
        assert set(CATALYSTS[name].elements) <= in_domain
    for name in HELD_OUT_ADSORBATES:
        assert set(ADSORBATES[name].atoms().get_chemical_symbols()) <= in_domain


# ----------------------------------------------------------------------------- IS2RE / IS2RS
def test_is2re_relaxed_targets(frames):
    for atoms in _all(frames, "is2re"):
        relaxed = atoms.copy()
        relaxed.positions = atoms.arrays["relaxed_positions"]
        relaxed.calc = EMT()
        free = relaxed.get_tags() != 0
        assert np.linalg.norm(relaxed.get_forces()[free], axis=1).max() < RELAX_FMAX + FORCE_ATOL
        assert relaxed.get_potential_energy() == pytest.approx(atoms.info["relaxed_energy"], abs=ENERGY_ATOL)
        assert atoms.info["relaxed_energy"] < atoms.get_potential_energy()
        assert not is_desorbed(relaxed) and not is_broken(relaxed, reference=atoms)


# ----------------------------------------------------------------------------- determinism and output dir
def test_same_seed_same_files_and_rerun_keeps_user_files(tiny, tmp_path):
    first, _ = tiny
    again = tmp_path / "again"
    shutil.copytree(first, again)
    (again / "notes.txt").write_text("mine")
    generate_reference_data(again, size="tiny", seed=0, progress=False)  # a previous output: allowed
    assert (again / "notes.txt").read_text() == "mine"
    for kind in ("s2ef", "is2re"):
        for split in SPLITS:
            name = f"{kind}/{split}.extxyz"
            assert (first / name).read_bytes() == (again / name).read_bytes(), name
    meta = [json.loads((d / "metadata.json").read_text(encoding="utf-8")) for d in (first, again)]
    for m in meta:
        m.pop("timings")
    assert meta[0] == meta[1]


def test_different_seed_different_data(tiny, tmp_path):
    first, _ = tiny
    generate_reference_data(tmp_path / "seed1", size="tiny", seed=1, progress=False)
    assert (first / "s2ef/train.extxyz").read_bytes() != (tmp_path / "seed1/s2ef/train.extxyz").read_bytes()


def test_unknown_size_and_bad_seed(tmp_path):
    with pytest.raises(ValueError, match="unknown size"):
        generate_reference_data(tmp_path / "x", size="huge", progress=False)
    with pytest.raises(ValueError, match="seed"):
        generate_reference_data(tmp_path / "x", size="tiny", seed=-1, progress=False)
    assert not (tmp_path / "x").exists()


def test_refuses_foreign_directory(tmp_path):
    (tmp_path / "data.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        generate_reference_data(tmp_path, size="tiny", progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["data.txt"]
    (tmp_path / "metadata.json").write_text(json.dumps({"generator": "someone else"}))
    with pytest.raises(ValueError, match="not empty"):
        generate_reference_data(tmp_path, size="tiny", progress=False)
    a_file = tmp_path / "data.txt"
    with pytest.raises(ValueError, match="not a directory"):
        generate_reference_data(a_file, size="tiny", progress=False)


# ----------------------------------------------------------------------------- building blocks
def _oh_on_cu() -> ase.Atoms:
    slab = build_slab(CATALYSTS["Cu"], "111", (2, 2), 3, np.random.default_rng(0))
    atoms, _ = place_adsorbate(slab, ADSORBATES["*OH"], np.random.default_rng(0), site="hollow")
    return atoms


def test_desorption_detector():
    atoms = _oh_on_cu()
    assert not is_desorbed(atoms)
    lifted = atoms.copy()
    lifted.positions[lifted.get_tags() == 2, 2] += 5.0
    assert is_desorbed(lifted)
    assert drop_reason(atoms, lifted, converged=True) == "desorbed"


def test_fragmentation_detector():
    atoms = _oh_on_cu()
    assert not is_broken(atoms)
    o, h = np.flatnonzero(atoms.get_tags() == 2)
    stretched = atoms.copy()
    bond = stretched.positions[h] - stretched.positions[o]
    stretched.positions[h] = stretched.positions[o] + 3.0 * bond / np.linalg.norm(bond)
    assert is_broken(stretched)
    assert drop_reason(atoms, stretched, converged=True) == "broken"
    assert drop_reason(atoms, atoms, converged=False) == "not_converged"
    assert drop_reason(atoms, atoms, converged=True) is None


def test_rearranged_adsorbate_is_broken():
    slab = build_slab(CATALYSTS["Pt"], "100", (2, 2), 3, np.random.default_rng(0))
    atoms, _ = place_adsorbate(slab, ADSORBATES["*NNO"], np.random.default_rng(1), site="top")
    n1, n2, o = np.flatnonzero(atoms.get_tags() == 2)
    # Fold N-N-O into a ring: still connected, but the O is now bonded to the first N too.
    ring = atoms.copy()
    ring.positions[o] = ring.positions[n1] + np.array([1.2, 0.0, 0.6])
    ring.positions[n2] = ring.positions[n1] + np.array([0.0, 0.0, 1.15])
    assert not is_broken(ring)
    assert is_broken(ring, reference=atoms)


@pytest.mark.parametrize("facet", ["111", "100", "211"])
def test_slabs_and_placement(facet):
    rng = np.random.default_rng(7)
    slab = build_slab(CATALYSTS["CuPd"], facet, (2, 2), 3, rng)
    tags = slab.atoms.get_tags()
    assert slab.atoms.pbc.all()
    assert set(np.unique(tags)) == {0, 1}
    np.testing.assert_array_equal(_fixed_indices(slab.atoms), np.flatnonzero(tags == 0))
    assert slab.atoms.positions[tags == 0, 2].max() < slab.atoms.positions[tags == 1, 2].min()
    assert set(slab.atoms.get_chemical_symbols()) == {"Cu", "Pd"}
    for name, adsorbate in ADSORBATES.items():
        for site in ("top", "bridge", "hollow"):
            atoms, used = place_adsorbate(slab, adsorbate, rng, site=site)
            assert used == site
            assert not is_desorbed(atoms) and not is_broken(atoms), (name, site)
            # The binding atom starts about one covalent bond length from the slab.
            ads, metal = np.flatnonzero(atoms.get_tags() == 2), np.flatnonzero(atoms.get_tags() != 2)
            dist = atoms.get_distances(ads[0], metal, mic=True)
            bond = covalent_radii[atoms.numbers[ads[0]]] + covalent_radii[atoms.numbers[metal[dist.argmin()]]]
            assert 0.99 < dist.min() / bond < MAX_START_BOND_RATIO, (name, site, dist.min() / bond)

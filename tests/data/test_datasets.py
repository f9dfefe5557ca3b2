"""Dataset readers, writers and validation (spherical_channels.data.datasets / formats)."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms
from torch.utils.data import DataLoader

from spherical_channels.data import (
    AtomicBatch,
    DataError,
    UnknownFormatError,
    open_dataset,
    validate_dataset,
    write_dataset,
)
from spherical_channels.data.formats import extxyz as extxyz_module
from spherical_channels.data.formats.oc20lmdb import UntrustedPickleWarning

WRITABLE = ["extxyz", "db", "aselmdb"]


def make_frames(count: int, seed: int = 0, natoms: int = 6) -> list[Atoms]:
    """Small periodic structures with energy, forces (full float64 noise), fixed atoms,
    tags and info."""
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(count):
        cell = np.diag([6.0, 6.5, 7.0]) + rng.normal(0, 0.1, (3, 3))
        grid = np.stack(np.meshgrid(*[np.arange(3)] * 3, indexing="ij"), -1).reshape(-1, 3)[:natoms]
        positions = grid * 1.9 + rng.normal(0, 0.05, (natoms, 3))
        atoms = Atoms(numbers=rng.choice([1, 6, 8, 29], natoms), positions=positions, cell=cell, pbc=True)
        atoms.set_tags(rng.integers(0, 3, natoms))
        atoms.set_constraint(FixAtoms(indices=[i for i in range(natoms) if i % 3 == k % 3]))
        atoms.info["sid"] = 1000 + k
        atoms.new_array("relaxed_positions", positions + rng.normal(0, 0.1, (natoms, 3)))
        atoms.calc = SinglePointCalculator(atoms, energy=float(rng.normal(-50, 5)), forces=rng.normal(0, 1, (natoms, 3)))
        frames.append(atoms)
    return frames


def fixed_mask(atoms: Atoms) -> np.ndarray:
    mask = np.zeros(len(atoms), bool)
    for c in atoms.constraints:
        if isinstance(c, FixAtoms):
            mask[c.get_indices()] = True
    return mask


def assert_same(got: Atoms, want: Atoms) -> None:
    """Bitwise equality of everything a training sample needs."""
    np.testing.assert_array_equal(got.numbers, want.numbers)
    np.testing.assert_array_equal(got.positions, want.positions)
    np.testing.assert_array_equal(got.cell.array, want.cell.array)
    np.testing.assert_array_equal(got.pbc, want.pbc)
    np.testing.assert_array_equal(got.get_tags(), want.get_tags())
    np.testing.assert_array_equal(fixed_mask(got), fixed_mask(want))
    assert got.calc.results["energy"] == want.calc.results["energy"]
    np.testing.assert_array_equal(got.calc.results["forces"], want.calc.results["forces"])


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("fmt", WRITABLE)
def test_round_trip_is_exact(tmp_path: Path, fmt: str) -> None:
    frames = make_frames(5)
    path = tmp_path / f"frames.{fmt}"
    assert write_dataset(frames, path) == 5
    ds = open_dataset(path)
    assert (len(ds), ds.format, ds.path) == (5, fmt, path)
    for got, want in zip(ds, frames):
        assert_same(got, want)
        assert int(got.info["sid"]) == want.info["sid"]
        np.testing.assert_array_equal(got.arrays["relaxed_positions"], want.arrays["relaxed_positions"])
    assert ds[-1].info["sid"] == 1004
    assert ds.describe()["count"] == 5 and ds.describe()["energy"] and ds.describe()["forces"]


def test_aselmdb_skips_deleted_rows(tmp_path: Path) -> None:
    from ase.db import connect

    frames = make_frames(4)
    write_dataset(frames, tmp_path / "d.aselmdb")
    db = connect(tmp_path / "d.aselmdb", type="aselmdb")
    db.delete([2])
    db.close()
    ds = open_dataset(tmp_path / "d.aselmdb")
    assert len(ds) == 3
    for got, want in zip(ds, [frames[0], frames[2], frames[3]]):
        assert_same(got, want)


def test_extxyz_output_is_read_by_ase(tmp_path: Path) -> None:
    """Our extxyz (floats as repr) is plain extxyz: ASE reads back the same float64 values."""
    from ase.io import read

    frames = make_frames(3)
    write_dataset(frames, tmp_path / "f.extxyz")
    for got, want in zip(read(tmp_path / "f.extxyz", ":"), frames):
        assert_same(got, want)


def test_extxyz_keeps_number_like_info_strings(tmp_path: Path) -> None:
    """Strings that extxyz would parse as numbers or booleans (a facet "111") come back as the
    same strings, from our reader and from ASE's; real numbers stay numbers."""
    from ase.io import read

    frame = make_frames(1)[0]
    info = {"facet": "111", "pair": "1 2", "flags": "T F", "name": "Cu", "count": 3, "x": 1.5}
    frame.info.update(info)
    write_dataset([frame], tmp_path / "f.extxyz")
    for got in (open_dataset(tmp_path / "f.extxyz")[0], read(tmp_path / "f.extxyz")):
        for key, value in info.items():
            assert got.info[key] == value, key
            assert isinstance(got.info[key], str) == isinstance(value, str), key


def test_ase_written_extxyz_is_exact_only_to_printed_precision(tmp_path: Path) -> None:
    """ASE prints per-atom floats with %16.8f: positions/forces survive to 1e-8, energy exactly."""
    from ase.io import write

    frames = make_frames(2)
    write(tmp_path / "ase.extxyz", frames, format="extxyz")
    for got, want in zip(open_dataset(tmp_path / "ase.extxyz"), frames):
        np.testing.assert_allclose(got.positions, want.positions, rtol=0, atol=5.1e-9)
        np.testing.assert_allclose(got.calc.results["forces"], want.calc.results["forces"], rtol=0, atol=5.1e-9)
        assert got.calc.results["energy"] == want.calc.results["energy"]
        np.testing.assert_array_equal(fixed_mask(got), fixed_mask(want))


def test_directory_of_shards_is_one_dataset_in_sorted_order(tmp_path: Path) -> None:
    frames = make_frames(5)
    (tmp_path / "shards").mkdir()
    write_dataset(frames[3:], tmp_path / "shards" / "b.extxyz")
    write_dataset(frames[:3], tmp_path / "shards" / "a.extxyz")
    ds = open_dataset(tmp_path / "shards")
    assert len(ds) == 5 and [f.name for f in ds.files] == ["a.extxyz", "b.extxyz"]
    for got, want in zip(ds, frames):
        assert_same(got, want)


def test_format_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        open_dataset(tmp_path / "missing.extxyz")
    (tmp_path / "s.cif").write_text("data_x\n")
    with pytest.raises(UnknownFormatError, match=r"s\.cif.*extension.*extxyz.*aselmdb.*oc20-lmdb"):
        open_dataset(tmp_path / "s.cif")
    with pytest.raises(DataError, match="unknown format 'pdb'"):
        open_dataset(tmp_path / "s.cif", format="pdb")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_dataset(make_frames(1), mixed / "a.extxyz")
    write_dataset(make_frames(1), mixed / "b.db")
    with pytest.raises(UnknownFormatError, match="mixes formats"):
        open_dataset(mixed)
    assert len(open_dataset(mixed, format="db")) == 1
    with pytest.raises(FileExistsError):
        write_dataset(make_frames(1), mixed / "a.extxyz")
    with pytest.raises(DataError, match="read-only"):
        write_dataset(make_frames(1), tmp_path / "out.lmdb")


def test_truncated_extxyz_names_the_structure(tmp_path: Path) -> None:
    path = tmp_path / "t.extxyz"
    write_dataset(make_frames(2), path)
    path.write_text(path.read_text().rsplit("\n", 3)[0] + "\n")
    with pytest.raises(DataError, match=r"t\.extxyz: structure 1: truncated"):
        open_dataset(path)


# ------------------------------------------------------------------ energy / forces keys
def keyed_frames() -> list[Atoms]:
    frames = []
    for k, atoms in enumerate(make_frames(3)):
        atoms.info["REF_energy"] = atoms.calc.results["energy"] + 1.0
        atoms.new_array("REF_forces", atoms.calc.results["forces"] * 2.0)
        frames.append(atoms)
    del frames[2].info["REF_energy"]
    return frames


@pytest.mark.parametrize("fmt", ["extxyz", "db"])
def test_energy_and_forces_keys(tmp_path: Path, fmt: str) -> None:
    frames = keyed_frames()
    path = tmp_path / f"k.{fmt}"
    write_dataset(frames, path)
    ds = open_dataset(path, energy_key="REF_energy", forces_key="REF_forces")
    for k in range(2):
        assert ds[k].calc.results["energy"] == frames[k].info["REF_energy"]
        np.testing.assert_array_equal(ds[k].calc.results["forces"], frames[k].arrays["REF_forces"])
    assert ds[2].calc.results.get("energy") is None  # no fallback to the other energy
    strict = open_dataset(path, energy_key="REF_energy", require_energy=True)
    with pytest.raises(DataError, match=rf"k\.{fmt}: structure 2: no energy under key 'REF_energy'"):
        strict[2]


# ------------------------------------------------------------------ validation
def bad_file(tmp_path: Path, spoil, index: int = 1, name: str = "bad.extxyz") -> Path:
    frames = make_frames(3)
    spoil(frames[index])
    path = tmp_path / name
    write_dataset(frames, path)
    return path


def _nan_position(a: Atoms) -> None:
    a.positions[2, 1] = np.nan


def _nan_forces(a: Atoms) -> None:
    a.calc.results["forces"][4] = np.inf


def _nan_energy(a: Atoms) -> None:
    a.calc.results["energy"] = float("nan")


def _overlap(a: Atoms) -> None:
    a.positions[4] = a.positions[2] + [0.00312, 0, 0]


def _unknown_element(a: Atoms) -> None:
    a.numbers[3] = 100


def _no_energy(a: Atoms) -> None:
    del a.calc.results["energy"]


@pytest.mark.parametrize(
    "spoil, kwargs, message",
    [
        (_nan_position, {}, r"non-finite \(NaN/inf\) positions for atoms 2"),
        (_nan_forces, {}, r"non-finite \(NaN/inf\) forces for atoms 4"),
        (_nan_energy, {}, "non-finite energy"),
        (_overlap, {}, r"atoms 2 and 4 are 0\.00312 Å apart \(overlapping atoms: distance <= 0\.01 Å\)$"),
        (_unknown_element, {}, r"unknown element: atomic numbers \[100\] outside the element table 1\.\.89 for atoms 3$"),
        (_no_energy, {"require_energy": True}, r"no energy \(required\)"),
    ],
)
def test_bad_structures_name_file_and_structure(tmp_path: Path, spoil, kwargs, message) -> None:
    ds = open_dataset(bad_file(tmp_path, spoil), **kwargs)
    ds[0], ds[2]  # the good ones read fine
    with pytest.raises(DataError, match=r"bad\.extxyz: structure 1: " + message) as info:
        ds[1]
    assert (info.value.path.name, info.value.index) == ("bad.extxyz", 1)


def test_missing_forces_when_required(tmp_path: Path) -> None:
    frames = make_frames(2)
    frames[1].calc = SinglePointCalculator(frames[1], energy=1.0)
    write_dataset(frames, tmp_path / "f.db")
    with pytest.raises(DataError, match=r"f\.db: structure 1: no forces \(required\)"):
        open_dataset(tmp_path / "f.db", require_forces=True)[1]


def test_atom_overlapping_its_own_periodic_image(tmp_path: Path) -> None:
    tiny = Atoms("Cu", positions=[[0, 0, 0]], cell=np.diag([0.005, 3.0, 3.0]), pbc=True)
    write_dataset(make_frames(1) + [tiny], tmp_path / "tiny.extxyz")
    with pytest.raises(DataError, match=r"tiny\.extxyz: structure 1: atom 0 is 0\.00500 Å from its own periodic image"):
        open_dataset(tmp_path / "tiny.extxyz")[1]


def test_singular_periodic_cell(tmp_path: Path) -> None:
    flat = Atoms("H2", positions=[[0, 0, 0], [1, 1, 0]], cell=[[3, 0, 0], [0, 3, 0], [3, 3, 0]], pbc=True)
    write_dataset([flat], tmp_path / "flat.db")
    with pytest.raises(DataError, match=r"flat\.db: structure 0: singular cell"):
        open_dataset(tmp_path / "flat.db")[0]
    molecule = Atoms("H2", positions=[[0, 0, 0], [0.74, 0, 0]])  # no cell, not periodic: fine
    write_dataset([molecule], tmp_path / "mol.db")
    assert len(open_dataset(tmp_path / "mol.db")[0]) == 2


def test_validate_dataset_reports_every_bad_structure(tmp_path: Path) -> None:
    frames = make_frames(6)
    _nan_position(frames[1])
    _overlap(frames[4])
    write_dataset(frames, tmp_path / "two_bad.aselmdb")
    errors = validate_dataset(open_dataset(tmp_path / "two_bad.aselmdb"), progress=False)
    assert [e.index for e in errors] == [1, 4]
    assert "two_bad.aselmdb: structure 4: atoms 2 and 4" in str(errors[1])


def test_shard_errors_also_give_the_dataset_index(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    write_dataset(make_frames(2), tmp_path / "d" / "a.extxyz")
    frames = make_frames(2)
    _nan_energy(frames[0])
    write_dataset(frames, tmp_path / "d" / "b.extxyz")
    with pytest.raises(DataError, match=r"b\.extxyz: structure 0 \(dataset index 2\): non-finite energy"):
        open_dataset(tmp_path / "d")[2]


# ------------------------------------------------------------------ streaming
def test_extxyz_parses_only_the_frame_asked_for(tmp_path: Path, monkeypatch) -> None:
    frames = make_frames(3, natoms=4)
    path = tmp_path / "many.extxyz"
    write_dataset((frames[k % 3] for k in range(300)), path)
    parsed = []
    real_parse = extxyz_module.parse_frame

    def counting_parse(text: str) -> Atoms:
        parsed.append(text)
        return real_parse(text)

    monkeypatch.setattr(extxyz_module, "parse_frame", counting_parse)
    ds = open_dataset(path)
    assert len(ds) == 300 and parsed == []  # the index is built without parsing
    assert_same(ds[157], frames[157 % 3])
    assert len(parsed) == 1 and parsed[0].count("\n") == 4 + 2


# ------------------------------------------------------------------ legacy OC20 LMDB
def oc20_data(atoms: Atoms, k: int, old_layout: bool):
    """A torch_geometric Data the way the OC20 preprocessing pickled it (float
    atomic numbers, cell [1, 3, 3], y, force, fixed as float)."""
    from torch_geometric.data import Data

    fields = {
        "pos": torch.tensor(atoms.positions, dtype=torch.float32),
        "atomic_numbers": torch.tensor(atoms.numbers, dtype=torch.float32),
        "cell": torch.tensor(atoms.cell.array, dtype=torch.float32).view(1, 3, 3),
        "natoms": len(atoms),
        "tags": torch.tensor(atoms.get_tags()),
        "fixed": torch.tensor(fixed_mask(atoms), dtype=torch.float32),
        "y": float(atoms.calc.results["energy"]),
        "force": torch.tensor(atoms.calc.results["forces"], dtype=torch.float32),
        "y_relaxed": float(atoms.calc.results["energy"]) - 1.5,
        "pos_relaxed": torch.tensor(atoms.arrays["relaxed_positions"], dtype=torch.float32),
        "sid": 7000 + k,
        "fid": k,
    }
    if old_layout:  # PyG 1.x pickles: fields as plain instance attributes, no _store
        data = Data.__new__(Data)
        data.__dict__.update(fields)
        return data
    return Data(**fields)


def write_oc20_lmdb(path: Path, frames: list[Atoms], old_layout: bool = False, with_length: bool = True, offset: int = 0) -> None:
    env = lmdb.open(str(path), subdir=False, map_size=1 << 26, meminit=False, map_async=True)
    with env.begin(write=True) as txn:
        for k, atoms in enumerate(frames):
            txn.put(f"{k}".encode("ascii"), pickle.dumps(oc20_data(atoms, offset + k, old_layout), protocol=-1))
        if with_length:
            txn.put(b"length", pickle.dumps(len(frames), protocol=-1))
    env.sync()
    env.close()


def assert_same_as_oc20(got: Atoms, want: Atoms, k: int) -> None:
    f32 = lambda x: np.asarray(x, dtype=np.float32).astype(np.float64)  # noqa: E731
    np.testing.assert_array_equal(got.numbers, want.numbers)
    np.testing.assert_array_equal(got.positions, f32(want.positions))
    np.testing.assert_array_equal(got.cell.array, f32(want.cell.array))
    assert got.pbc.all()
    np.testing.assert_array_equal(got.get_tags(), want.get_tags())
    np.testing.assert_array_equal(fixed_mask(got), fixed_mask(want))
    assert got.calc.results["energy"] == want.calc.results["energy"]
    np.testing.assert_array_equal(got.calc.results["forces"], f32(want.calc.results["forces"]))
    assert got.info["relaxed_energy"] == want.calc.results["energy"] - 1.5
    np.testing.assert_array_equal(got.arrays["relaxed_positions"], f32(want.arrays["relaxed_positions"]))
    assert got.info["sid"] == 7000 + k and got.info["fid"] == k


@pytest.mark.parametrize("old_layout", [False, True])
def test_oc20_lmdb_reads_pickled_data(tmp_path: Path, old_layout: bool) -> None:
    frames = make_frames(4)
    path = tmp_path / f"s2ef_{old_layout}.lmdb"
    write_oc20_lmdb(path, frames, old_layout=old_layout, with_length=old_layout)
    with pytest.warns(UntrustedPickleWarning, match="only open files you trust"):
        ds = open_dataset(path, trust_pickle=True)
    assert (len(ds), ds.format) == (4, "oc20-lmdb")
    for k, (got, want) in enumerate(zip(ds, frames)):
        assert_same_as_oc20(got, want, k)
    # and on to an exact format, unchanged
    write_dataset(ds, tmp_path / "s2ef.aselmdb")
    for got, want in zip(open_dataset(tmp_path / "s2ef.aselmdb"), ds):
        assert_same(got, want)
        assert got.info["relaxed_energy"] == want.info["relaxed_energy"]


def test_oc20_lmdb_directory_of_shards(tmp_path: Path) -> None:
    frames = make_frames(5)
    shards = tmp_path / "s2ef"
    shards.mkdir()
    write_oc20_lmdb(shards / "data.0000.lmdb", frames[:2])
    write_oc20_lmdb(shards / "data.0001.lmdb", frames[2:], offset=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrustedPickleWarning)
        ds = open_dataset(shards, trust_pickle=True)
    assert len(ds) == 5
    for k, (got, want) in enumerate(zip(ds, frames)):
        assert_same_as_oc20(got, want, k)


# ------------------------------------------------------------------ DataLoader workers
def test_dataloader_with_workers(tmp_path: Path) -> None:
    frames = make_frames(8)
    write_dataset(frames, tmp_path / "w.aselmdb")
    write_dataset(frames, tmp_path / "w.db")
    write_oc20_lmdb(tmp_path / "w.lmdb", frames)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrustedPickleWarning)
        datasets = [open_dataset(tmp_path / f"w.{ext}", trust_pickle=True) for ext in ("aselmdb", "db", "lmdb")]
    expected = torch.tensor([a.calc.results["energy"] for a in frames], dtype=torch.float64)
    for ds in datasets:
        ds[0]  # open the environment in the parent first: workers must not reuse it
        pickle.loads(pickle.dumps(ds))  # picklable while open (spawned workers)
        loader = DataLoader(
            ds, batch_size=3, num_workers=2, collate_fn=lambda a: AtomicBatch.from_atoms(a, dtype=torch.float64)
        )
        energies = torch.cat([b.energy for b in loader])
        torch.testing.assert_close(energies, expected, rtol=0, atol=0)

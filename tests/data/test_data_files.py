"""Empty files are errors, reading never modifies the input, and writing never loses an
existing file."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from spherical_channels.cli import main
from spherical_channels.data import DataError, open_dataset, write_dataset


def frames(count: int = 3) -> list[Atoms]:
    rng = np.random.default_rng(0)
    out = []
    for k in range(count):
        atoms = Atoms("Cu2O", positions=[[0, 0, 0], [1.8, 1.8, 0], [0.9, 0.9, 1.8]], cell=np.eye(3) * 3.6, pbc=True)
        atoms.positions += rng.normal(0, 0.02, (3, 3))
        atoms.calc = SinglePointCalculator(atoms, energy=-10.0 - k, forces=rng.normal(size=(3, 3)))
        out.append(atoms)
    return out


def snapshot(folder: Path) -> dict:
    """Every file under ``folder``: bytes and mtime."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def _run_check(path: Path) -> None:
    main(["data", "check", str(path), "--quiet"])


def _run_stats(path: Path) -> None:
    main(["data", "stats", str(path), "--quiet"])


@pytest.mark.parametrize("name", ["e.extxyz", "e.xyz", "e.db", "e.aselmdb", "e.lmdb"])
def test_zero_byte_file_is_an_error_and_stays_untouched(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"")
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    before = snapshot(tmp_path)
    with pytest.raises(DataError, match=rf"^{path}: holds no structures \(the file is empty: 0 bytes\)$") as info:
        open_dataset(path, trust_pickle=False)
    assert info.value.path == path
    for run in (_run_check, _run_stats):
        with pytest.raises(SystemExit, match=rf"{name}: holds no structures"):
            run(path)
    assert snapshot(tmp_path) == before  # no schema written into the .db, no lock files


def test_training_call_gets_the_clear_error(tmp_path: Path) -> None:
    """The call the trainer makes (require_energy/forces, a model's element table)."""
    path = tmp_path / "train.extxyz"
    path.write_bytes(b"")
    kwargs = dict(format=None, energy_key=None, forces_key=None, require_energy=True, require_forces=True, max_atomic_number=89)
    with pytest.raises(DataError, match="train.extxyz: holds no structures") as info:
        open_dataset(path, **kwargs)
    assert isinstance(info.value, ValueError)  # what 'scn train' turns into its message


def test_files_without_structures(tmp_path: Path) -> None:
    (tmp_path / "blank.extxyz").write_text("\n  \n\n")
    with pytest.raises(DataError, match=r"blank\.extxyz: holds no structures$"):
        open_dataset(tmp_path / "blank.extxyz")
    import ase.db

    with ase.db.connect(tmp_path / "rows.db", use_lock_file=False) as db:  # schema, no rows
        db.write(Atoms("H"))
    with ase.db.connect(tmp_path / "rows.db", use_lock_file=False) as db:
        db.delete([1])
    with pytest.raises(DataError, match=r"rows\.db: holds no structures$"):
        open_dataset(tmp_path / "rows.db")
    shards = tmp_path / "shards"
    shards.mkdir()
    write_dataset(frames(2), shards / "a.extxyz")
    (shards / "b.extxyz").write_bytes(b"")
    with pytest.raises(DataError, match=r"b\.extxyz: holds no structures"):
        open_dataset(shards)


def test_a_foreign_sqlite_file_is_not_written_to(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    before = snapshot(tmp_path)
    with pytest.raises(DataError, match=r"other\.db: cannot open as an ASE SQLite database: no 'systems' table"):
        open_dataset(path)
    assert snapshot(tmp_path) == before  # ASE would have added its tables
    (tmp_path / "text.db").write_text("not a database at all\n" * 10)
    before = snapshot(tmp_path)
    with pytest.raises(DataError, match=r"text\.db: cannot open as an ASE SQLite database"):
        open_dataset(tmp_path / "text.db")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("fmt", ["extxyz", "db", "aselmdb"])
def test_reading_commands_leave_the_input_unchanged(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"d.{fmt}"
    write_dataset(frames(), path)
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    before = snapshot(tmp_path)
    ds = open_dataset(path)
    assert [a.calc.results["energy"] for a in ds] == [-10.0, -11.0, -12.0]
    ds.close()
    assert main(["data", "check", str(path), "--quiet"]) == 0
    with pytest.warns(UserWarning, match="not determined"):  # every structure is Cu2O
        assert main(["data", "stats", str(path), "--quiet"]) == 0
    assert snapshot(tmp_path) == before


def test_not_a_file_nor_a_directory(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.extxyz"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="pipe.extxyz: neither a regular file nor a directory"):
        open_dataset(fifo)


def test_failed_overwrite_keeps_the_old_file(tmp_path: Path) -> None:
    """Defect: write_dataset removed an existing output before writing, so an error mid-way
    (a bad structure met by ``scn data convert --overwrite``) lost the old file."""
    for fmt in ("extxyz", "db", "aselmdb"):
        path = tmp_path / f"out.{fmt}"
        write_dataset(frames(2), path)
        before = snapshot(tmp_path)

        def failing():
            yield frames(1)[0]
            raise DataError("bad structure")

        with pytest.raises(DataError, match="bad structure"):
            write_dataset(failing(), path, overwrite=True)
        assert snapshot(tmp_path) == before  # old file kept, no partial files left
        assert len(open_dataset(path)) == 2


def test_writing_no_structures_writes_nothing(tmp_path: Path) -> None:
    """A file without structures could not be read back: it is not written."""
    with pytest.raises(DataError, match=r"none\.extxyz: no structures to write"):
        write_dataset([], tmp_path / "none.extxyz")
    assert list(tmp_path.iterdir()) == []


def test_convert_onto_its_own_input(tmp_path: Path) -> None:
    """Defect: ``scn data convert a.extxyz a.extxyz --overwrite`` deleted its input before
    reading it. The output now replaces the input only when complete."""
    path = tmp_path / "a.extxyz"
    write_dataset(frames(), path)
    text = path.read_text()
    assert main(["data", "convert", str(path), str(path), "--overwrite", "--quiet"]) == 0
    assert path.read_text() == text
    db = tmp_path / "a.db"
    write_dataset(frames(), db)
    assert main(["data", "convert", str(db), str(db), "--overwrite", "--quiet"]) == 0
    assert [a.calc.results["energy"] for a in open_dataset(db)] == [-10.0, -11.0, -12.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.db", "a.extxyz"]


def test_structure_without_atoms_is_written_without_warnings(tmp_path: Path) -> None:
    """Defect: the extxyz writer dropped the species and pos columns of a 0-atom frame with
    warnings (sized them by their values), and named its temporary file in warnings."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_dataset([frames(1)[0], Atoms()], tmp_path / "z.extxyz")
    assert "Properties=species:S:1:pos:R:3" in (tmp_path / "z.extxyz").read_text().splitlines()[-1]
    ds = open_dataset(tmp_path / "z.extxyz", validate=False)
    assert [len(a) for a in ds] == [3, 0]
    odd = frames(1)[0]
    odd.new_array("matrix", np.zeros((3, 2, 2)))
    with pytest.warns(UserWarning, match=rf"^{tmp_path / 'w.extxyz'}: extxyz output cannot hold per-atom array 'matrix'"):
        write_dataset([odd], tmp_path / "w.extxyz")


def test_extxyz_frames_reach_the_file_as_they_are_written(tmp_path: Path) -> None:
    """A process killed before close (SIGKILL) must not lose the frames already written."""
    from ase.io import read

    from spherical_channels.data.formats.extxyz import ExtxyzWriter

    path = tmp_path / "out.extxyz"
    writer = ExtxyzWriter(path)
    try:
        for k in range(2):
            writer.write(Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.7 + 0.1 * k]]))
            frames = read(path, ":")  # read by another reader while the writer stays open
            assert len(frames) == k + 1
            assert frames[-1].positions[1, 2] == pytest.approx(0.7 + 0.1 * k)
    finally:
        writer.close()

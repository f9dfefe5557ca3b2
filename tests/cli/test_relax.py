"""`scn relax` (and `simulation.relax`): constraints or none, failing structures, interruptions."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT
from ase.build import fcc111
from ase.constraints import FixAtoms
from ase.io import read

from spherical_channels.cli import main
from spherical_channels.data.formats.extxyz import ExtxyzWriter
from spherical_channels.simulation.relax import relax

CHECKPOINT = Path(__file__).resolve().parents[1] / "fixtures" / "cfg_tiny" / "ckpt.pt"


def h2(distance: float) -> Atoms:
    return Atoms("H2", positions=[[0, 0, 0], [0, 0, distance]], cell=np.eye(3) * 8.0, pbc=True)


def write(path: Path, frames: list[Atoms]) -> Path:
    with ExtxyzWriter(path) as writer:
        for atoms in frames:
            writer.write(atoms)
    return path


def strict_json(path: Path):  # noqa: ANN201
    def refuse(token: str) -> None:
        raise AssertionError(f"non-strict JSON token {token} in {path}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_structures_with_and_without_constraints(tmp_path: Path) -> None:
    fixed = Atoms("HHO", positions=[[0, 0, 0], [0, 0, 0.97], [0.3, 0.9, 0.4]], cell=np.eye(3) * 8.0, pbc=True)
    fixed.set_constraint(FixAtoms(indices=[0]))
    source = write(tmp_path / "in.extxyz", [fixed, h2(0.74)])
    out = tmp_path / "relaxed.extxyz"
    assert main(["relax", str(CHECKPOINT), str(source), "-o", str(out), "--steps", "2", "--quiet"]) == 0
    before, after = read(source, ":"), read(out, ":")
    assert [a.info["source_index"] for a in after] == [0, 1]
    np.testing.assert_array_equal(after[0].positions[0], before[0].positions[0])  # the fixed atom stays
    assert [c.get_indices().tolist() for c in after[0].constraints] == [[0]] and not after[1].constraints
    assert not np.allclose(after[1].positions, before[1].positions)  # an unconstrained structure moves
    summary = strict_json(out.with_suffix(".json"))
    assert [r["steps"] for r in summary] == [2, 2] and all(np.isfinite(r["energy"]) for r in summary)


def test_a_failing_structure_is_reported_and_the_others_relaxed(tmp_path: Path) -> None:
    source = write(tmp_path / "in.extxyz", [h2(0.74), h2(0.00001), h2(0.8)])
    out = tmp_path / "relaxed.extxyz"
    with pytest.raises(SystemExit, match=r"1 of 3 structures failed \(first: .*structure 1.*apart") as exc:
        main(["relax", str(CHECKPOINT), str(source), "-o", str(out), "--steps", "1", "--quiet"])
    assert "\n" not in exc.value.code
    assert [a.info["source_index"] for a in read(out, ":")] == [0, 2]
    summary = strict_json(out.with_suffix(".json"))
    assert [r["index"] for r in summary] == [0, 1, 2] and "apart" in summary[1]["error"] and "error" not in summary[2]


def test_an_interrupted_run_keeps_the_structures_relaxed(tmp_path: Path, monkeypatch) -> None:
    simulation = importlib.import_module("spherical_channels.simulation")
    calls = []

    def interrupted_on_the_second(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return relax(*args, **kwargs)

    monkeypatch.setattr(simulation, "relax", interrupted_on_the_second)
    source = write(tmp_path / "in.extxyz", [h2(0.74), h2(0.8), h2(0.9)])
    out = tmp_path / "relaxed.extxyz"
    with pytest.raises(KeyboardInterrupt):
        main(["relax", str(CHECKPOINT), str(source), "-o", str(out), "--steps", "1", "--quiet", "--engine", "ase"])
    assert [a.info["source_index"] for a in read(out, ":")] == [0]
    assert [r["index"] for r in strict_json(out.with_suffix(".json"))] == [0]
    assert not list(tmp_path.glob(".*.partial"))


def test_an_interrupted_batched_run_keeps_the_structures_relaxed(tmp_path: Path, monkeypatch) -> None:
    """The batched engine hands over each structure as it finishes; an interruption after the
    first keeps that one."""
    engine = importlib.import_module("spherical_channels.simulation.engine")
    original = engine.relax_many

    def interrupted_after_the_first(*args, on_finish, **kwargs):  # noqa: ANN002, ANN003, ANN202
        def finish(outcome):  # noqa: ANN001, ANN202
            on_finish(outcome)
            raise KeyboardInterrupt

        return original(*args, on_finish=finish, **kwargs)

    monkeypatch.setattr(importlib.import_module("spherical_channels.simulation"), "relax_many",
                        interrupted_after_the_first)
    source = write(tmp_path / "in.extxyz", [h2(0.74), h2(0.8), h2(0.9)])
    out = tmp_path / "relaxed.extxyz"
    with pytest.raises(KeyboardInterrupt):
        main(["relax", str(CHECKPOINT), str(source), "-o", str(out), "--steps", "3", "--quiet"])
    kept = read(out, ":")
    assert len(kept) == 1 and len(strict_json(out.with_suffix(".json"))) == 1
    assert not list(tmp_path.glob(".*.partial"))


def test_both_engines_relax_alike(tmp_path: Path) -> None:
    """The batched engine and one ASE optimiser per structure (same FIRE) give the same
    relaxed structures, in input order, with the same summary."""
    slabs = []
    for k in range(3):
        slab = fcc111("Cu", (2, 2, 2), vacuum=5.0)
        slab.set_constraint(FixAtoms(indices=list(range(4))))
        slab.rattle(0.05 + 0.03 * k, seed=k)
        slabs.append(slab)
    source = write(tmp_path / "in.extxyz", slabs)
    outs = {}
    for engine in ("batched", "ase"):
        out = tmp_path / f"{engine}.extxyz"
        main(["relax", str(CHECKPOINT), str(source), "-o", str(out), "--engine", engine, "--optimizer", "FIRE",
              "--steps", "15", "--quiet"])
        outs[engine] = (read(out, ":"), strict_json(out.with_suffix(".json")))
    (batched, b_summary), (ase_frames, a_summary) = outs["batched"], outs["ase"]
    assert [a.info["source_index"] for a in batched] == [0, 1, 2] == [a.info["source_index"] for a in ase_frames]
    for b, a, slab in zip(batched, ase_frames, slabs):
        # float32 model: the two paths round differently (batched vs single structures)
        np.testing.assert_allclose(b.positions, a.positions, atol=1e-4)
        np.testing.assert_array_equal(b.positions[:4], slab.positions[:4])  # fixed atoms stay
        assert np.abs(b.positions[4:] - slab.positions[4:]).max() > 1e-3  # the others moved
    for b, a in zip(b_summary, a_summary):
        assert b["index"] == a["index"] and b["steps"] == a["steps"] and b["converged"] == a["converged"]
        assert b["energy"] == pytest.approx(a["energy"], abs=1e-4)


def test_engine_options_are_checked(tmp_path: Path) -> None:
    source = write(tmp_path / "in.extxyz", [h2(0.74)])
    with pytest.raises(SystemExit, match="use --engine ase for BFGS"):
        main(["relax", str(CHECKPOINT), str(source), "--optimizer", "BFGS", "-o", str(tmp_path / "r.extxyz")])
    with pytest.raises(SystemExit, match="--rotation-average needs --engine ase"):
        main(["relax", str(CHECKPOINT), str(source), "--rotation-average", "2", "-o", str(tmp_path / "r.extxyz")])
    with pytest.raises(SystemExit, match="--batch-atoms must be >= 1"):
        main(["relax", str(CHECKPOINT), str(source), "--batch-atoms", "0", "-o", str(tmp_path / "r.extxyz")])
    assert not (tmp_path / "r.extxyz").exists()


def test_relax_input_errors_are_clear(tmp_path: Path) -> None:
    empty = tmp_path / "empty.extxyz"
    empty.write_text("")
    with pytest.raises(SystemExit, match="holds no structures") as exc:
        main(["relax", str(CHECKPOINT), str(empty), "-o", str(tmp_path / "r.extxyz")])
    assert str(empty) in exc.value.code
    source = write(tmp_path / "in.extxyz", [h2(0.74)])
    with pytest.raises(SystemExit, match="--fmax > 0"):
        main(["relax", str(CHECKPOINT), str(source), "--fmax", "0"])
    with pytest.raises(SystemExit, match="summary"):  # the summary would overwrite the structures
        main(["relax", str(CHECKPOINT), str(source), "-o", str(tmp_path / "r.json")])
    with pytest.raises(SystemExit, match="rotation_average") as exc:
        main(["relax", str(CHECKPOINT), str(source), "--rotation-average", "-1", "--engine", "ase",
              "-o", str(tmp_path / "r.extxyz")])
    assert str(CHECKPOINT) in exc.value.code
    assert not (tmp_path / "r.extxyz").exists()


class NaNAfter(Calculator):
    """EMT until ``good`` calculations were done, then NaN forces (a diverging model)."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, good: int) -> None:
        super().__init__()
        self.good, self.calls, self.emt = good, 0, EMT()

    def calculate(self, atoms=None, properties=None, system_changes=all_changes) -> None:  # noqa: ANN001
        super().calculate(atoms, properties, system_changes)
        self.calls += 1
        self.emt.calculate(atoms, ["energy", "forces"], system_changes)
        self.results = dict(self.emt.results)
        if self.calls > self.good:
            self.results["forces"] = np.full_like(self.results["forces"], np.nan)


def test_relax_stops_at_the_step_with_non_finite_forces(tmp_path: Path) -> None:
    """Without the check, NaN forces move the atoms to NaN and the failure surfaces later, as
    an error about positions (or, with EMT, as NaN results)."""
    slab = fcc111("Cu", (1, 1, 2), vacuum=4.0)
    slab.rattle(0.05, seed=0)
    trajectory = tmp_path / "t.traj"
    with pytest.raises(ValueError, match="non-finite forces at step 2"):
        relax(slab, NaNAfter(good=2), steps=10, trajectory=trajectory)
    frames = read(trajectory, ":")  # closed and readable: steps 0, 1 and the failing one
    assert len(frames) == 3 and np.isfinite(frames[1].positions).all()
    with pytest.raises(ValueError, match="fmax > 0"):
        relax(slab, EMT(), fmax=float("nan"))

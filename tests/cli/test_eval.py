"""`scn eval` on data with incomplete references, strict JSON, failures that keep what was done."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import fcc111, molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms

from spherical_channels.cli import main
from spherical_channels.data.batch import AtomicBatch
from spherical_channels.data.formats.extxyz import ExtxyzWriter
from spherical_channels.evaluation.metrics import EFWT_ENERGY, EFWT_FORCE

TINY_MODEL = dict(num_interactions=2, lmax=2, mmax=1, sphere_channels=8, sphere_channels_reduce=8, hidden_channels=16,
                  num_sphere_samples=16, num_basis_functions=8, cutoff=5.0, max_num_neighbors=16)
ELEMENT_ENERGIES = {1: -1.0, 6: -2.0, 8: -3.0, 29: -4.0}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SCN in this package's checkpoint format, with per-element energies."""
    from spherical_channels.models.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
    from spherical_channels.models.scn import SCN

    torch.manual_seed(0)
    model = SCN(**TINY_MODEL)
    path = tmp_path_factory.mktemp("eval") / "tiny.pt"
    save_checkpoint({"format": CHECKPOINT_FORMAT, "model_config": model.config.to_dict(), "state_dict": model.state_dict(),
                     "ema_state_dict": None, "statistics": {"element_energies": {str(z): e for z, e in ELEMENT_ENERGIES.items()}}},
                    path)
    return path


def structures() -> list[Atoms]:
    """Water and methane in boxes, a small Cu slab with O (bottom layer fixed)."""
    water, methane = molecule("H2O"), molecule("CH4")
    for atoms in (water, methane):
        atoms.center(vacuum=4.0)
        atoms.pbc = True
    slab = fcc111("Cu", (2, 2, 2), vacuum=5.0)
    slab += Atoms("O", positions=[slab.positions[-1] + [0.0, 0.0, 1.8]])
    slab.set_constraint(FixAtoms(indices=[0, 1, 2, 3]))
    slab.info.pop("adsorbate_info", None)  # a dict, which extxyz cannot store
    return [water, methane, slab]


def predictions(checkpoint: Path, frames: list[Atoms]) -> tuple[np.ndarray, list[np.ndarray]]:
    """The checkpoint's energies and per-structure forces on ``frames`` (one float32 batch, as
    `scn eval` with its default batch size evaluates them)."""
    from spherical_channels.models.checkpoint import load_model

    with torch.no_grad():
        out = load_model(checkpoint)(AtomicBatch.from_atoms(frames))
    forces = out["forces"].double().numpy()
    return out["energy"].double().numpy(), np.split(forces, np.cumsum([len(a) for a in frames])[:-1])


def write(path: Path, frames: list[Atoms]) -> Path:
    with ExtxyzWriter(path) as writer:
        for atoms in frames:
            writer.write(atoms)
    return path


def strict_json(path: Path) -> dict:
    def refuse(token: str) -> None:
        raise AssertionError(f"non-strict JSON token {token} in {path}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_one_structure_without_forces_leaves_the_force_metrics_of_the_others(checkpoint: Path, tmp_path: Path, capsys) -> None:
    """The reported defect: forces 5 eV/A off on the water, the methane without forces in the
    same batch; the force metrics of the whole batch were dropped and EFwT came out 1.0."""
    frames = structures()
    energy, forces = predictions(checkpoint, frames)
    water, methane, slab = frames
    offset = np.zeros_like(forces[0])
    offset[:, 2] = 5.0
    water.calc = SinglePointCalculator(water, energy=energy[0], forces=forces[0] + offset)
    methane.calc = SinglePointCalculator(methane, energy=energy[1])
    slab.calc = SinglePointCalculator(slab, energy=energy[2], forces=forces[2])
    data = write(tmp_path / "mixed.extxyz", frames)
    out = tmp_path / "metrics.json"
    assert main(["eval", str(checkpoint), str(data), "-o", str(out)]) == 0
    s2ef = strict_json(out)["splits"]["mixed"]["s2ef"]
    assert (s2ef["num_structures"], s2ef["num_energy_structures"], s2ef["num_force_structures"], s2ef["num_efwt_structures"]) == (3, 3, 2, 2)
    free = len(water) + (len(slab) - 4)  # the slab's 4 fixed atoms are not evaluated
    assert s2ef["num_force_atoms"] == free
    # |error| 5 on one component of each water atom, ~0 elsewhere (float32 round trip)
    assert s2ef["force_mae"] == pytest.approx(5.0 * len(water) / (3 * free), abs=1e-5)
    assert s2ef["energy_mae"] < 1e-4 < EFWT_ENERGY and 1e-4 < EFWT_FORCE
    assert s2ef["efwt"] == 0.5  # the slab passes, the water fails; the methane is not an EFwT structure
    report = capsys.readouterr().out
    assert "energy metrics cover 3, force metrics 2, EFwT 2" in report


def test_data_without_energies_gives_force_metrics_and_null_for_the_rest(checkpoint: Path, tmp_path: Path) -> None:
    frames = structures()
    _, forces = predictions(checkpoint, frames)
    for atoms, f in zip(frames, forces):
        atoms.calc = SinglePointCalculator(atoms, forces=f + 0.01)
    data = write(tmp_path / "forces_only.extxyz", frames)
    out = tmp_path / "metrics.json"
    assert main(["eval", str(checkpoint), str(data), "-o", str(out), "--baseline", "--quiet"]) == 0
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    split = strict_json(out)["splits"]["forces_only"]
    for row in (split["s2ef"], split["baseline"]):
        assert row["energy_mae"] is None and row["energy_rmse"] is None and row["efwt"] is None
        assert row["num_energy_structures"] == 0 and row["num_efwt_structures"] == 0 and row["num_force_structures"] == 3
    assert split["s2ef"]["force_mae"] == pytest.approx(0.01, abs=1e-6)


def test_a_failing_relaxation_is_reported_and_the_others_scored(checkpoint: Path, tmp_path: Path, capsys) -> None:
    box = np.eye(3) * 8.0
    frames = [Atoms("H2", positions=[[0, 0, 0], [0, 0, d]], cell=box, pbc=True) for d in (0.74, 0.00001, 0.8)]
    for atoms in frames:
        atoms.info["relaxed_energy"] = 0.0
    data = write(tmp_path / "initial.extxyz", frames)
    out = tmp_path / "metrics.json"
    assert main(["eval", str(checkpoint), str(data), "--steps", "2", "-o", str(out), "--quiet"]) == 0
    assert "structure 1" in capsys.readouterr().err
    relax = strict_json(out)["splits"]["initial"]["relax"]
    assert (relax["num_structures"], relax["num_relaxed"], relax["num_failed"]) == (3, 2, 1)
    assert relax["is2re"]["num_structures"] == 2 and [r["index"] for r in relax["failed"]] == [1]


def test_a_failing_split_keeps_the_splits_done(checkpoint: Path, tmp_path: Path) -> None:
    frames = structures()
    energy, forces = predictions(checkpoint, frames)
    for atoms, e, f in zip(frames, energy, forces):
        atoms.calc = SinglePointCalculator(atoms, energy=e, forces=f)
    good = write(tmp_path / "good.extxyz", frames)
    bad = tmp_path / "bad.extxyz"
    bad.write_text(good.read_text().replace("Cu ", "Xx ", 1))  # an unknown element in the slab
    out = tmp_path / "metrics.json"
    with pytest.raises(SystemExit) as exc:
        main(["eval", str(checkpoint), str(good), str(bad), "-o", str(out), "--quiet"])
    assert str(bad) in exc.value.code and "\n" not in exc.value.code
    report = strict_json(out)
    assert set(report["splits"]) == {"good"} and report["splits"]["good"]["s2ef"]["efwt"] == 1.0
    assert str(bad) in report["incomplete"]


def test_eval_argument_errors_are_clear(checkpoint: Path, tmp_path: Path) -> None:
    data = write(tmp_path / "plain.extxyz", structures()[:1])
    with pytest.raises(SystemExit, match="--batch-size must be >= 1"):
        main(["eval", str(checkpoint), str(data), "--batch-size", "0"])
    with pytest.raises(SystemExit, match="--max-structures must be >= 1"):
        main(["eval", str(checkpoint), str(data), "--max-structures", "0"])
    official = Path(__file__).resolve().parents[1] / "fixtures" / "cfg_tiny" / "ckpt.pt"
    with pytest.raises(SystemExit, match="--baseline needs") as exc:
        main(["eval", str(official), str(data), "--baseline", "--quiet"])
    assert str(official) in exc.value.code
    empty = tmp_path / "empty.extxyz"
    empty.write_text("")
    with pytest.raises(SystemExit, match="holds no structures") as exc:
        main(["eval", str(checkpoint), str(data), str(empty), "--quiet"])
    assert str(empty) in exc.value.code


@pytest.mark.parametrize("content", [b"", b"\n\n"], ids=["0-byte", "blank-lines"])
def test_data_items_names_a_file_without_structures(tmp_path: Path, content: bytes) -> None:
    from spherical_channels.cli.common import data_items

    path = tmp_path / "none.extxyz"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"{path}: holds no structures"):
        data_items([str(path)])


def test_relaxation_splits_show_the_unrelaxed_baseline(checkpoint: Path, tmp_path: Path, capsys) -> None:
    """Initial structures at their relaxed targets: the table has an 'unrelaxed' row with ADwT
    1.000 and the adsorbate-only ADwT column; the JSON keeps the model's keys and adds
    ``adwt_adsorbate`` and ``unrelaxed`` (strict, the IS2RE baseline from the model's energy)."""
    frames = []
    for shift in (0.0, 0.05):
        atoms = structures()[2]
        atoms.positions[-1, 2] += shift
        atoms.set_tags([0] * 4 + [1] * 4 + [2])
        atoms.arrays["relaxed_positions"] = atoms.positions.copy()
        atoms.info["relaxed_energy"] = -1.0
        frames.append(atoms)
    data = write(tmp_path / "initial.extxyz", frames)
    out = tmp_path / "metrics.json"
    assert main(["eval", str(checkpoint), str(data), "--steps", "2", "--reference", "emt", "-o", str(out)]) == 0
    table = capsys.readouterr().out
    assert "ADwT ads" in table and "unrelaxed: the initial structures" in table
    unrelaxed_line = next(line for line in table.splitlines() if line.startswith("  unrelaxed"))
    assert "1.000" in unrelaxed_line
    relax = strict_json(out)["splits"]["initial"]["relax"]
    assert {"adwt", "mean_distance", "num_structures", "afbt", "num_afbt_structures"} <= set(relax["is2rs"])
    assert relax["is2rs"]["num_adsorbate_structures"] == 2 and 0 <= relax["is2rs"]["adwt_adsorbate"] <= 1
    assert relax["unrelaxed"]["is2rs"]["adwt"] == 1.0 and relax["unrelaxed"]["is2rs"]["adwt_adsorbate"] == 1.0
    assert relax["unrelaxed"]["is2rs"]["num_afbt_structures"] == 2
    baseline = relax["unrelaxed"]["is2re"]  # the model's energies at the initial positions against -1 eV
    assert baseline["energy_source"] == "model" and baseline["num_structures"] == 2
    assert baseline["energy_mae"] == pytest.approx(np.mean(np.abs(predictions(checkpoint, frames)[0] + 1.0)), abs=1e-3)


def test_a_split_without_adsorbate_tags_gives_null_adsorbate_adwt(checkpoint: Path, tmp_path: Path) -> None:
    frame = structures()[2]  # no tags: no adsorbate atoms
    frame.arrays["relaxed_positions"] = frame.positions.copy()
    data = write(tmp_path / "untagged.extxyz", [frame])
    out = tmp_path / "metrics.json"
    assert main(["eval", str(checkpoint), str(data), "--steps", "1", "-o", str(out), "--quiet"]) == 0
    relax = strict_json(out)["splits"]["untagged"]["relax"]
    assert relax["is2rs"]["adwt_adsorbate"] is None and relax["is2rs"]["num_adsorbate_structures"] == 0
    assert relax["unrelaxed"]["is2rs"]["adwt"] == 1.0 and "is2re" not in relax["unrelaxed"]


def test_the_demo_report_prints_the_unrelaxed_rows() -> None:
    from spherical_channels.cli.demo import _report

    relax = {"num_structures": 2, "is2re": {"energy_mae": 0.3, "ewt": 0.0, "num_structures": 2},
             "is2rs": {"adwt": 0.4, "adwt_adsorbate": 0.3, "num_structures": 2},
             "unrelaxed": {"is2re": {"energy_mae": 0.8, "ewt": 0.0, "num_structures": 2},
                           "is2rs": {"adwt": 0.2, "adwt_adsorbate": 0.1, "num_structures": 2}}}
    timings = dict(data_s=1.0, train_s=2.0, eval_s=3.0, relax_s=4.0, total_s=10.0)
    report = _report({"test_id": {"relax": relax}}, {"steps": 5}, timings, Path("out"))
    row = next(line for line in report.splitlines() if line.startswith("  unrelaxed")).split()
    assert row[1:] == ["2", "-", "-", "-", "-", "0.8000", "0.000", "0.200", "0.100", "-"]
    assert "ADwT 0.200 unrelaxed -> 0.400 relaxed" in report

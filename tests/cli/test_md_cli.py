"""`scn md`: the printed drift is its log's, outputs, warnings, errors, interruptions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import fcc111, molecule
from ase.constraints import FixAtoms
from ase.io import read
from torch import nn

from spherical_channels.cli import common, main
from spherical_channels.data.formats.extxyz import ExtxyzWriter
from spherical_channels.simulation.md import read_md_log
from spherical_channels.testing.potentials import MorsePotential

from scn_helpers import scale_like_fixtures

pytestmark = pytest.mark.usefixtures("one_thread")

OFFICIAL = Path(__file__).resolve().parents[1] / "fixtures" / "cfg_tiny" / "ckpt.pt"  # direct forces
# one resolution and no neighbour cap: the energy surface of random weights stays smooth
TINY = dict(num_interactions=2, lmax=2, mmax=1, sphere_channels=8, sphere_channels_reduce=8, hidden_channels=16,
            num_sphere_samples=16, num_basis_functions=8, cutoff=5.0, max_num_neighbors=500, num_resolutions=1)
DRIFT = re.compile(r"total-energy drift: (\S+) eV/atom \(max \|Etot - Etot0\|: (\S+) eV/atom\)")


@pytest.fixture(scope="module")
def conservative(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random energy-conserving SCN (forces -dE/dx) in this package's checkpoint format."""
    from spherical_channels.models.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
    from spherical_channels.models.scn import SCN

    torch.manual_seed(0)
    model = scale_like_fixtures(SCN(**TINY, direct_forces=False))
    path = tmp_path_factory.mktemp("md") / "conservative.pt"
    save_checkpoint({"format": CHECKPOINT_FORMAT, "model_config": model.config.to_dict(),
                     "state_dict": model.state_dict(), "ema_state_dict": None}, path)
    return path


def water() -> Atoms:
    atoms = molecule("H2O")
    atoms.center(vacuum=4.0)
    atoms.pbc = True
    return atoms


def slab() -> Atoms:
    atoms = fcc111("Cu", (2, 1, 2), vacuum=5.0)
    atoms += Atoms("O", positions=[atoms.positions[-1] + [0.0, 0.0, 1.8]])
    atoms.set_constraint(FixAtoms(indices=[0, 1]))
    atoms.info.pop("adsorbate_info", None)  # a dict, which extxyz cannot store
    return atoms


@pytest.fixture(scope="module")
def structures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("md") / "in.extxyz"
    with ExtxyzWriter(path) as writer:
        for atoms in (water(), slab()):
            writer.write(atoms)
    return path


def drift_from_log(path: Path, natoms: int) -> tuple[float, float]:
    etot = read_md_log(path)["etot_eV"]
    return (etot[-1] - etot[0]) / natoms, np.abs(etot - etot[0]).max() / natoms


def test_nve_prints_the_drift_of_its_log(conservative: Path, structures: Path, tmp_path: Path, capsys) -> None:
    """The printed drift is the log's; and, the model being conservative, the energy error is
    velocity Verlet's O(dt^2): halving the time step (same 7.5 fs) divides it by ~4."""
    deviations = []
    for timestep, steps in (("0.25", 30), ("0.125", 60)):
        trajectory = tmp_path / f"w{steps}.traj"
        args = ["md", str(conservative), str(structures), "--index", "0", "--steps", str(steps), "--timestep",
                timestep, "--log-interval", str(steps // 6), "--dtype", "float64", "--trajectory", str(trajectory)]
        assert main(args) == 0
        out, err = capsys.readouterr()
        assert "warning" not in err
        assert f"md nve: {steps} steps of {timestep} fs (7.5 fs), 3 atoms" in out
        printed = [float(x) for x in DRIFT.search(out).groups()]
        log = trajectory.with_suffix(".log")  # the default log
        # printed with 7 significant digits; the log's energies to 1e-10 eV
        np.testing.assert_allclose(printed, drift_from_log(log, 3), rtol=1e-6, atol=1e-10)
        assert abs(printed[0]) <= printed[1] and printed[1] > 0
        temperatures = read_md_log(log)["temperature_K"]
        assert f"mean temperature: {temperatures[1:].mean():.2f} K" in out
        assert len(read(trajectory, ":")) == 7  # every steps/6 steps, from step 0
        deviations.append(printed[1])
    assert 3.0 < deviations[0] / deviations[1] < 5.0


def test_replicas_run_batched_into_an_output_dir(conservative: Path, structures: Path, tmp_path: Path,
                                                  capsys) -> None:
    out_dir = tmp_path / "runs"
    args = ["md", str(conservative), str(structures), "--replicas", "2", "--ensemble", "nvt", "--steps", "8",
            "--log-interval", "4", "--output-dir", str(out_dir), "--seed", "3", "--dtype", "float64"]
    assert main(args) == 0
    out = capsys.readouterr().out
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == sorted([f"0000{i}_r{r}.{ext}" for i in (0, 1) for r in (0, 1) for ext in ("traj", "log")]
                           + ["summary.json"])
    summary = json.loads((out_dir / "summary.json").read_text())
    assert [(r["index"], r["replica"], r["steps"]) for r in summary["runs"]] == [(0, 0, 8), (0, 1, 8), (1, 0, 8),
                                                                             (1, 1, 8)]
    rows = [line.split() for line in out.splitlines() if re.match(r"^\s+\d+\s+\d+\s+\d+\s+8\s", line)]
    assert len(rows) == 4
    for row, record in zip(rows, summary["runs"]):
        drift, deviation = drift_from_log(Path(record["log"]), record["natoms"])
        np.testing.assert_allclose([float(row[5]), float(row[6])], [drift, deviation], rtol=1e-6, atol=1e-10)
    first, second = (read(out_dir / f"00001_r{r}.traj", -1) for r in (0, 1))
    start = slab()
    np.testing.assert_array_equal(first.positions[:2], start.positions[:2])  # fixed atoms stay
    assert np.abs(first.positions - second.positions).max() > 1e-4  # replicas differ


def test_a_direct_force_model_is_warned_about(structures: Path, tmp_path: Path, capsys) -> None:
    trajectory = tmp_path / "d.traj"
    assert main(["md", str(OFFICIAL), str(structures), "--index", "0", "--steps", "2", "--trajectory",
                 str(trajectory), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "scn md: warning:" in err and "direct force head" in err and "does not conserve" in err
    assert err.count("direct force head") == 1
    assert len(read_md_log(trajectory.with_suffix(".log"))["time_fs"]) == 2  # steps 0 and 2


def test_outputs_are_never_overwritten(conservative: Path, structures: Path, tmp_path: Path) -> None:
    trajectory = tmp_path / "t.traj"
    args = ["md", str(conservative), str(structures), "--index", "0", "--steps", "1", "--trajectory",
            str(trajectory), "--quiet"]
    assert main(args) == 0
    before = trajectory.with_suffix(".log").read_text()
    with pytest.raises(SystemExit, match=r"t\.traj exists"):
        main(args)
    assert trajectory.with_suffix(".log").read_text() == before
    out_dir = tmp_path / "many"
    (out_dir).mkdir()
    (out_dir / "summary.json").write_text("{}")
    with pytest.raises(SystemExit, match="summary.json exists"):
        main(["md", str(conservative), str(structures), "--output-dir", str(out_dir), "--steps", "1"])
    assert sorted(p.name for p in out_dir.iterdir()) == ["summary.json"]


@pytest.mark.parametrize(("extra", "match"), [
    (["--steps", "-1"], "--steps must be >= 0"),
    (["--timestep", "0"], "--timestep must be > 0"),
    (["--timestep", "nan"], "--timestep must be > 0"),
    (["--temperature", "-5"], "--temperature must be >= 0"),
    (["--ensemble", "nvt", "--friction", "0"], "--friction must be > 0"),
    (["--replicas", "0"], "--replicas must be >= 1"),
    (["--log-interval", "0"], "--log-interval must be >= 1"),
    (["--index", "7"], "--index 7: .* holds 2 structures"),
    (["--trajectory", "x.traj"], "--trajectory names one file, but there are 2 runs"),
    (["--log", "x.log"], "--log names one file"),
    (["--index", "0", "--replicas", "2", "--log", "x.log"], "--log names one file"),
    (["--initial-temperature", "10", "--keep-velocities"], "exclude each other"),
    (["--index", "0", "--keep-velocities"], "--keep-velocities: structures \\[0\\] .* no velocities"),
    (["--index", "0", "--device", "nonsense"], "device 'nonsense' is not usable"),
])
def test_bad_arguments_are_one_clear_line(conservative: Path, structures: Path, tmp_path: Path, monkeypatch,
                                          extra: list[str], match: str) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=match) as exc:
        main(["md", str(conservative), str(structures), "--quiet", *extra])
    message = exc.value.code
    assert isinstance(message, str) and message.startswith("scn md: ") and "\n" not in message
    assert not list(tmp_path.iterdir())  # nothing written


def test_missing_inputs_and_unknown_ensemble(conservative: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit, match="no such file"):
        main(["md", str(conservative), str(tmp_path / "missing.extxyz")])
    with pytest.raises(SystemExit, match="no such file"):
        main(["md", str(tmp_path / "missing.pt"), str(tmp_path / "missing.extxyz")])
    with pytest.raises(SystemExit) as exc:
        main(["md", str(conservative), "x.extxyz", "--ensemble", "npt"])
    assert exc.value.code == 2 and "invalid choice: 'npt'" in capsys.readouterr().err
    frozen = slab()
    frozen.set_constraint(FixAtoms(indices=list(range(len(frozen)))))
    path = tmp_path / "frozen.extxyz"
    with ExtxyzWriter(path) as writer:
        writer.write(frozen)
    with pytest.raises(SystemExit, match="structure 0 of .*every atom is fixed"):
        main(["md", str(conservative), str(path), "--trajectory", str(tmp_path / "f.traj"), "--quiet"])


class Failing(nn.Module):
    """The Morse potential until ``good`` calls, then an interruption or NaN forces."""

    conservative = True
    regress_forces = True

    def __init__(self, good: int, failure: str) -> None:
        super().__init__()
        self.inner, self.good, self.failure, self.calls = MorsePotential(), good, failure, 0

    def forward(self, batch, stress: bool = False):  # noqa: ANN001, ANN201
        self.calls += 1
        out = self.inner(batch, stress=stress)
        if self.calls > self.good:
            if self.failure == "interrupt":
                raise KeyboardInterrupt
            out = {**out, "forces": torch.full_like(out["forces"], float("nan"))}
        return out


@pytest.mark.parametrize("runs", ["single", "batched"])
def test_an_interrupted_run_keeps_its_trajectory_and_log(structures: Path, tmp_path: Path, monkeypatch, capsys,
                                                         runs: str) -> None:
    monkeypatch.setattr(common, "load_checkpoint_model", lambda *a, **k: ({}, Failing(good=6, failure="interrupt")))
    where = ["--index", "1", "--trajectory", str(tmp_path / "t.traj")] if runs == "single" else [
        "--output-dir", str(tmp_path / "runs")]
    with pytest.raises(KeyboardInterrupt):
        main(["md", "model.pt", str(structures), "--steps", "20", "--log-interval", "2", "--quiet", *where])
    assert "interrupted" in capsys.readouterr().err
    log = tmp_path / "t.log" if runs == "single" else tmp_path / "runs" / "00001.log"
    trajectory = log.with_suffix(".traj")
    np.testing.assert_allclose(read_md_log(log)["time_fs"], [0.0, 1.0, 2.0])  # steps 0, 2, 4 (step 6 interrupted)
    assert len(read(trajectory, ":")) == 3


def test_non_finite_forces_stop_the_run_naming_the_step(structures: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(common, "load_checkpoint_model", lambda *a, **k: ({}, Failing(good=3, failure="nan")))
    trajectory = tmp_path / "t.traj"
    with pytest.raises(SystemExit, match=r"structure 1 of .*non-finite forces at step 3 .*until then are in") as exc:
        main(["md", "model.pt", str(structures), "--index", "1", "--steps", "10", "--log-interval", "1",
              "--trajectory", str(trajectory), "--quiet"])
    assert "\n" not in exc.value.code
    assert len(read(trajectory, ":")) == 3  # steps 0, 1, 2

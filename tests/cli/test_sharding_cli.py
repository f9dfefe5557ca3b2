"""`scn relax`, `scn predict` and `scn eval` sharded over 2 gloo processes by torchrun give the
outputs of one process, in the same order; a sharded run that stops keeps each rank's share.

Each structure (relax, eval's relaxations) or batch (predict, eval's S2EF) is computed by the
same code on the same input in both runs, one thread each, so the outputs are compared
byte for byte; the metrics' sums are added in the same order, so they are identical too.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import add_adsorbate, fcc111, molecule
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms
from ase.io import read

from spherical_channels.cli import build_parser, main
from spherical_channels.data.formats.extxyz import ExtxyzWriter
from spherical_channels.training.distributed import DistributedContext

CHECKPOINT = Path(__file__).resolve().parents[1] / "fixtures" / "cfg_tiny" / "ckpt.pt"

# one torchrun launch runs the three commands in a row, each as `python -m spherical_channels.cli`
# runs it; the process group is started here, so the commands leave it to this script
DRIVER = """
import contextlib, io, json, runpy, sys
import torch.distributed as dist
dist.init_process_group("gloo")
rank, codes, report = dist.get_rank(), {}, sys.argv[2]
for name, argv in json.loads(sys.argv[1]).items():
    out = io.StringIO()
    sys.argv = ["scn", *argv]
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_module("spherical_channels.cli", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        codes[name] = exc.code
    codes[name + ".stdout"] = out.getvalue()
json.dump(codes, open(report + f".rank{rank}.json", "w"))
dist.destroy_process_group()
"""


def h2(distance: float) -> Atoms:
    return Atoms("H2", positions=[[0, 0, 0], [0, 0, distance]], cell=np.eye(3) * 8.0, pbc=True)


def slab(height: float = 1.8) -> Atoms:
    """A 2x2x2 Cu(111) slab with O on top, bottom layer fixed, OC20 tags."""
    atoms = fcc111("Cu", (2, 2, 2), vacuum=5.0)
    add_adsorbate(atoms, "O", height, "fcc")
    atoms.set_constraint(FixAtoms(indices=[0, 1, 2, 3]))
    atoms.info.pop("adsorbate_info", None)  # a dict, which extxyz cannot store
    atoms.set_tags([0] * 4 + [1] * 4 + [2])
    return atoms


def write(path: Path, frames: list[Atoms]) -> Path:
    with ExtxyzWriter(path) as writer:
        for atoms in frames:
            writer.write(atoms)
    return path


def labelled(atoms: Atoms, seed: int) -> Atoms:
    atoms.rattle(0.05, seed=seed)
    atoms.calc = EMT()
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
    return atoms


def commands(data: Path, out: Path) -> dict[str, list[str]]:
    """The three commands, writing under ``out``. Structure 3 cannot be taken (overlapping
    atoms): it falls to rank 1 (structures 1, 3, 5; predict's batch 1 of 3), and rank 0 must
    report it as one process does."""
    ckpt, inputs = str(CHECKPOINT), str(data / "structures.extxyz")
    return {
        "relax": ["relax", ckpt, inputs, "-o", str(out / "relaxed.extxyz"), "--steps", "3",
                  "--trajectory-dir", str(out / "trajectories"), "--quiet"],
        "predict": ["predict", ckpt, inputs, "-o", str(out / "predicted.extxyz"), "--json", str(out / "predicted.json"),
                    "--batch-size", "2"],
        "eval": ["eval", ckpt, str(data / "s2ef.extxyz"), str(data / "initial.extxyz"), "-o", str(out / "metrics.json"),
                 "--batch-size", "2", "--steps", "2", "--reference", "emt"],
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every command once in this process and once under torchrun with 2 processes: their
    output directories, exit codes and standard outputs."""
    data = tmp_path_factory.mktemp("data")
    write(data / "structures.extxyz", [h2(0.74), slab(), h2(0.8), h2(0.00001), h2(0.9), slab(2.2)])
    s2ef = [labelled(slab(1.8 + 0.1 * k) if k % 2 == 0 else molecule(["H2O", "CH4"][k // 2]), k) for k in range(5)]
    for atoms in s2ef[1::2]:
        atoms.center(vacuum=4.0)
        atoms.pbc = True
    write(data / "s2ef.extxyz", s2ef)
    initial = []
    for k in range(3):
        atoms = slab(1.8 + 0.05 * k)
        atoms.rattle(0.03, seed=10 + k)
        atoms.arrays["relaxed_positions"] = atoms.positions + 0.02 * k
        atoms.info["relaxed_energy"] = 1.0 + k
        initial.append(atoms)
    write(data / "initial.extxyz", initial)

    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process runs
    plain: dict = {}
    try:
        for name, argv in commands(data, one).items():
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                try:
                    plain[name] = main(argv)
                except SystemExit as exc:
                    plain[name] = exc.code
            plain[name + ".stdout"] = out.getvalue()
    finally:
        torch.set_num_threads(threads)

    driver = two / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(driver), json.dumps(commands(data, two)), str(two / "codes")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((two / f"codes.rank{r}.json").read_text()) for r in (0, 1)]
    return {"one": one, "two": two, "plain": plain, "ranks": ranks, "stderr": done.stderr}


def same_bytes(runs: dict, name: str) -> bytes:
    one, two = (runs[key] / name for key in ("one", "two"))
    assert one.read_bytes() == two.read_bytes(), name
    return one.read_bytes()


def test_relax_gives_the_structures_of_one_process_in_the_same_order(runs: dict) -> None:
    same_bytes(runs, "relaxed.extxyz")
    same_bytes(runs, "relaxed.json")
    frames = read(runs["two"] / "relaxed.extxyz", ":")
    assert [a.info["source_index"] for a in frames] == [0, 1, 2, 4, 5]  # 3 failed
    assert [c.get_indices().tolist() for c in frames[1].constraints] == [[0, 1, 2, 3]]
    summary = json.loads((runs["two"] / "relaxed.json").read_text())
    assert [r["index"] for r in summary] == list(range(6)) and "apart" in summary[3]["error"]
    trajectories = sorted(p.name for p in (runs["two"] / "trajectories").iterdir())
    assert trajectories == sorted(p.name for p in (runs["one"] / "trajectories").iterdir())
    assert trajectories == [f"{i:05d}.traj" for i in (0, 1, 2, 4, 5)]  # the failing one stopped before


def test_predict_gives_the_predictions_of_one_process(runs: dict) -> None:
    same_bytes(runs, "predicted.extxyz")
    report = json.loads(same_bytes(runs, "predicted.json"))
    assert [p["index"] for p in report["predictions"]] == [0, 1, 2, 4, 5]
    assert [f["index"] for f in report["failures"]] == [3]
    # the table is rank 0's alone and the one process's; only the timing line differs
    table = runs["ranks"][0]["predict.stdout"].splitlines()
    assert table[:-1] == runs["plain"]["predict.stdout"].splitlines()[:-1] and len(table) == 7
    assert table[-1].startswith("5 structures in ")


def test_eval_gives_the_metrics_and_table_of_one_process(runs: dict) -> None:
    metrics = json.loads(same_bytes(runs, "metrics.json"))
    assert metrics["splits"]["s2ef"]["s2ef"]["num_structures"] == 5
    assert metrics["splits"]["initial"]["relax"]["num_relaxed"] == 3
    assert runs["ranks"][0]["eval.stdout"] == runs["plain"]["eval.stdout"]
    assert "unrelaxed" in runs["plain"]["eval.stdout"]


def test_rank_0_reports_and_every_rank_exits_as_one_process_does(runs: dict) -> None:
    plain, (rank0, rank1) = runs["plain"], runs["ranks"]
    for name in ("relax", "predict"):  # one structure failed: exit status 1
        assert isinstance(plain[name], str) and "1 of 6 structures failed" in plain[name]
        assert rank0[name] == plain[name].replace(str(runs["one"]), str(runs["two"]))
        assert rank1[name] == 1
    assert plain["eval"] == rank0["eval"] == rank1["eval"] == 0
    assert all(rank1[f"{name}.stdout"] == "" for name in ("relax", "predict", "eval"))
    # the failing structure is reported once, by rank 1, which relaxed it
    assert runs["stderr"].count("scn relax: failed: ") == 1
    for directory in ("one", "two"):
        assert not list(runs[directory].glob(".*partial")) and not list(runs[directory].glob("*.rank*-of-*"))


# ---------------------------------------------------------------------- a sharded run that stops


def test_an_interrupted_rank_keeps_its_share_under_its_own_names(tmp_path: Path, monkeypatch, capsys) -> None:
    """Rank 1 of 2, interrupted on its second structure (before any exchange): the one it
    relaxed is in STEM.rank1-of-2.extxyz, its summary in STEM.rank1-of-2.json."""
    from spherical_channels.cli.common import resolve_relax_engine
    from spherical_channels.cli.relax import _relax_all
    from spherical_channels.models.checkpoint import load_model
    from spherical_channels.simulation import SCNCalculator
    from spherical_channels.simulation.relax import relax

    simulation = importlib.import_module("spherical_channels.simulation")
    calls = []

    def interrupted_on_the_second(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return relax(*args, **kwargs)

    monkeypatch.setattr(simulation, "relax", interrupted_on_the_second)
    out = tmp_path / "relaxed.extxyz"
    args = build_parser().parse_args(
        ["relax", str(CHECKPOINT), "in.extxyz", "-o", str(out), "--steps", "1", "--quiet", "--engine", "ase"])
    resolve_relax_engine("relax", args)
    ctx = DistributedContext(rank=1, world_size=2, local_rank=1)
    structures = [h2(d) for d in (0.7, 0.74, 0.8, 0.85, 0.9)]  # rank 1: structures 1 and 3
    with pytest.raises(KeyboardInterrupt):
        _relax_all(args, structures, SCNCalculator(load_model(CHECKPOINT)), ctx)
    kept = read(tmp_path / "relaxed.rank1-of-2.extxyz", ":")
    assert [a.info["source_index"] for a in kept] == [1]
    assert [r["index"] for r in json.loads((tmp_path / "relaxed.rank1-of-2.json").read_text())] == [1]
    assert not out.exists() and not list(tmp_path.glob(".*partial"))
    assert "rank 1 of 2 stopped after 1 of the 5 structures (its share: 2)" in capsys.readouterr().err

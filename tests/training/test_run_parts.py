"""The trainer's parts on their own: run directory rules and lock, train state, log truncation,
the collate's error messages."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from spherical_channels.training import RunDirectory, RunDirectoryError, TrainState
from spherical_channels.training.data import GraphCollate, IndexedDataset
from spherical_channels.training.logs import RunLogger, read_log


def test_a_new_run_needs_an_empty_directory(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path / "run")
    run.check()  # missing: fine
    run.path.mkdir()
    run.check()  # empty: fine
    (run.path / "logs").mkdir()
    (run.path / "config.yaml").write_text("x")
    with pytest.raises(RunDirectoryError, match=r"not empty \(config\.yaml, logs\) but holds no checkpoint.*--overwrite"):
        run.check()
    with pytest.raises(RunDirectoryError, match=r"--resume: .* holds config\.yaml, logs but no checkpoint .*nothing to resume"):
        run.check(resume=True)
    run.check(overwrite=True)
    run.checkpoints.mkdir()
    run.last_checkpoint.write_bytes(b"ckpt")
    with pytest.raises(RunDirectoryError, match=r"already holds a run .*continue it with --resume"):
        run.check()
    run.check(resume=True)
    with pytest.raises(RunDirectoryError, match="give one of them"):
        run.check(resume=True, overwrite=True)
    (run.path / "data.extxyz").write_text("precious")
    with pytest.raises(RunDirectoryError, match=r"does not write \(data\.extxyz\); they are not removed"):
        run.check(overwrite=True)
    (run.path / "data.extxyz").unlink()
    assert sorted(run.clear()) == ["checkpoints", "config.yaml", "logs"] and run.contents() == []
    with pytest.raises(RunDirectoryError, match="holds no run"):
        RunDirectory(tmp_path / "missing").check(resume=True)


def test_the_lock_admits_one_run_and_a_failed_start_leaves_no_directory(tmp_path: Path) -> None:
    first, second = RunDirectory(tmp_path / "run"), RunDirectory(tmp_path / "run")
    first.open()
    assert first.locked and first.contents() == []  # the lock file does not count as content
    with pytest.raises(RunDirectoryError, match=r"in use by another training process \(pid \d+ \(this process"):
        second.open()
    first.release()
    assert not (tmp_path / "run").exists()  # created by `first`, and nothing was written
    second.open()
    (second.path / "config.yaml").write_text("x")
    second.release()
    assert (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / ".lock").exists()
    with pytest.raises(RunDirectoryError):
        RunDirectory(tmp_path / "run").open()  # refused: released again, directory kept
    assert (tmp_path / "run" / "config.yaml").exists()


def test_stale_checkpoint_temporaries_are_removed(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path)
    run.checkpoints.mkdir()
    (run.checkpoints / "last.pt").write_bytes(b"kept")
    (run.checkpoints / ".last.pt.abc123.tmp").write_bytes(b"partial")
    assert [p.name for p in run.remove_stale_temporaries()] == [".last.pt.abc123.tmp"]
    assert [p.name for p in run.checkpoints.iterdir()] == ["last.pt"]


def test_config_yaml_is_rewritten_only_when_it_changed(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path)
    assert run.write_config({"optim": {"lr": 1, "max_steps": 5}}) == []
    assert run.write_config({"optim": {"lr": 1, "max_steps": 5}}) == []
    assert run.write_config({"optim": {"lr": 1, "max_steps": 9}}) == ["optim.max_steps"]
    assert "max_steps: 9" in run.config_file.read_text()


def test_train_state_round_trip_restores_counters_and_random_state() -> None:
    state = TrainState(step=7, epoch=1, batch_in_epoch=3)
    assert state.record_validation(0.5) and not state.record_validation(0.6) and not state.record_validation(float("nan"))
    saved = state.state_dict()
    expected = (torch.rand(3), random.random())
    other = TrainState()
    other.load_state_dict(saved)
    assert (other.step, other.epoch, other.batch_in_epoch, other.best) == (7, 1, 3, {"force_mae": 0.5, "step": 7})
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    other.advance()
    other.end_epoch()
    assert (other.step, other.epoch, other.batch_in_epoch) == (8, 2, 0)
    with pytest.raises(ValueError, match="random state of 1 processes, not of process 1"):
        other.load_state_dict(saved, rank=1)


def test_resumed_logs_drop_rows_after_the_checkpoint(tmp_path: Path) -> None:
    logger = RunLogger(tmp_path, tensorboard=False)
    for step in range(1, 8):
        logger.log("train", step, {"loss": float(step)})
    logger.log("val", 4, {"force_mae": 0.1})
    logger.log("val", 6, {"force_mae": 0.1})
    logger.close()
    with (tmp_path / "train.csv").open("a") as fh:
        fh.write("8,0.")  # a row torn by the kill
    resumed = RunLogger(tmp_path, tensorboard=False, resume_step=4)
    assert resumed.dropped == {"train": 4, "val": 1}
    assert [r["step"] for r in read_log(tmp_path / "train.csv")] == [1, 2, 3, 4]
    assert [r["step"] for r in read_log(tmp_path / "val.csv")] == [4]
    resumed.log("train", 5, {"loss": 5.5})
    assert read_log(tmp_path / "train.csv")[-1] == {"step": 5.0, "loss": 5.5}


def _atoms(positions, energy: float = 1.0) -> Atoms:  # noqa: ANN001
    atoms = Atoms("H2", positions=positions, cell=np.eye(3) * 10.0, pbc=False)
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=np.zeros((2, 3)))
    return atoms


def test_the_collate_names_bad_structures_by_their_data_set_index() -> None:
    good = _atoms([[0, 0, 0], [0, 0, 0.74]])
    collate = GraphCollate(torch.float32, cutoff=5.0, max_num_neighbors=8, source="data.extxyz")
    ok = collate([(3, good), (8, good)])
    assert ok.error is None and ok.indices == [3, 8] and ok.graph.num_edges == 4
    overlapping = _atoms([[0, 0, 0], [0, 0, 0.001]])
    bad = collate([(3, good), (8, overlapping)])
    assert bad.batch is None and bad.error.startswith("data.extxyz: structure 8: atoms 0 and 1 are 0.00100 ") and "overlapping" in bad.error
    too_big = _atoms([[0, 0, 0], [0, 0, 0.74]], energy=1e39)  # finite in float64, not in float32
    bad = collate([(3, good), (5, good), (11, too_big)])
    assert bad.error.startswith("data.extxyz: structure 11: ") and "float32" in bad.error, bad.error

    class Broken:
        def __len__(self) -> int:
            return 2

        def __getitem__(self, index: int):  # noqa: ANN204
            raise ValueError(f"file.db: structure {index}: unreadable")

    index, failure = IndexedDataset(Broken())[1]
    assert collate([(0, good), (index, failure)]).error == "file.db: structure 1: unreadable"

"""`scn train` as a command: exit codes, signals, messages, the run directory rules."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from training_helpers import TINY_MODEL, read_csv

from spherical_channels.cli import main
from spherical_channels.models.checkpoint import read_checkpoint

SCN_TRAIN = [sys.executable, "-c", "import sys; from spherical_channels.cli import main; sys.exit(main())", "train"]


def write_config(path: Path, data: Path, out: Path, **optim) -> Path:
    path.write_text(yaml.safe_dump({
        "model": {"name": "scn", **TINY_MODEL},
        "optim": {"batch_size": 4, "max_steps": 4, "warmup_steps": 1, **optim},
        "dataset": {"train": str(data / "s2ef" / "train.extxyz"), "val": str(data / "s2ef" / "val_id.extxyz")},
        "run": {"output_dir": str(out), "progress": False, "plots": False, "log_every": 1},
    }))
    return path


def test_sigterm_saves_the_run_and_exits_143(tiny_reference: Path, tmp_path: Path) -> None:
    """A real `scn train` process sent SIGTERM mid-run, as a scheduler would: it saves its
    step, says how to continue and exits 143, not 0; `--resume` then continues from there."""
    out = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_reference, out, max_steps=100000)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([*SCN_TRAIN, str(config)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "logs" / "train.csv"
    deadline = time.monotonic() + 120
    while not (log.exists() and len(read_csv(log)) >= 2):  # training is under way
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no training step logged in 120 s"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-2000:]
    assert "SIGTERM received: stopped at step" in stderr and "scn train CONFIG --resume" in stderr
    step = read_checkpoint(out / "checkpoints" / "last.pt")["trainer_state"]["step"]
    assert step >= 2 and [int(r["step"]) for r in read_csv(log)] == list(range(1, step + 1))
    assert not (out / "summary.json").exists() and not (out / ".lock").exists()

    assert main(["train", str(config), "--resume", "--set", f"optim.max_steps={step + 1}"]) == 0
    assert read_checkpoint(out / "checkpoints" / "last.pt")["trainer_state"]["step"] == step + 1


def test_an_empty_data_file_fails_with_one_line_and_leaves_nothing(tiny_reference: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    empty = tmp_path / "empty.extxyz"
    empty.write_bytes(b"")
    config = tmp_path / "c.yaml"
    write_config(config, tiny_reference, out)
    raw = yaml.safe_load(config.read_text())
    raw["dataset"]["train"] = str(empty)
    config.write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit) as info:
        main(["train", str(config)])
    message = str(info.value.code)
    assert message.startswith(f"scn train: {empty}") and "empty" in message and "\n" not in message
    assert not out.exists()  # a failed start leaves no directory that would block the next one
    write_config(config, tiny_reference, out, max_steps=1)
    assert main(["train", str(config)]) == 0  # no --overwrite needed


def test_the_run_directory_rules_on_the_command_line(tiny_reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_reference, out, max_steps=2)
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match=r"is not empty \(notes\.txt\) but holds no checkpoint"):
        main(["train", str(config)])
    with pytest.raises(SystemExit, match=r"--overwrite: .* holds files a training run does not write \(notes\.txt\)"):
        main(["train", str(config), "--overwrite"])
    (out / "notes.txt").unlink()
    assert main(["train", str(config)]) == 0
    with pytest.raises(SystemExit, match="already holds a run .*--resume.*--overwrite"):
        main(["train", str(config)])
    with pytest.raises(SystemExit) as info:  # argparse: contradictory options
        main(["train", str(config), "--resume", "--overwrite"])
    assert info.value.code == 2
    assert main(["train", str(config), "--overwrite", "--set", "optim.max_steps=1"]) == 0
    assert read_checkpoint(out / "checkpoints" / "last.pt")["trainer_state"]["step"] == 1

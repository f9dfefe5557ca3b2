"""The training loop end to end on tiny EMT data: learning, resuming, NaN handling, many processes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spherical_channels.models.checkpoint import load_checkpoint, load_model
from spherical_channels.training import TrainConfig, Trainer, TrainingDiverged

TINY_MODEL = dict(num_interactions=2, lmax=2, mmax=1, sphere_channels=8, sphere_channels_reduce=8, hidden_channels=16,
                  num_sphere_samples=16, num_basis_functions=8, cutoff=5.0, max_num_neighbors=16)


def config(data: Path, out: Path, **optim) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": TINY_MODEL,
        "optim": {"batch_size": 4, "lr_initial": 2e-3, "warmup_steps": 2, "scheduler": "cosine", "max_steps": 12, **optim},
        "dataset": {"train": str(data / "s2ef" / "train.extxyz"), "val": str(data / "s2ef" / "val_id.extxyz")},
        "run": {"output_dir": str(out), "log_every": 1, "progress": False, "plots": False},
    })


def training_set_loss(trainer: Trainer) -> tuple[float, dict]:
    """The training loss over the whole training set (EMA weights, deterministic roll)."""
    m = trainer.validate(trainer.train_data)
    optim = trainer.config.optim
    loss = (optim.energy_coefficient * m["energy_mae"] + optim.force_coefficient * m["force_l2mae"]) / trainer.force_scale
    return loss, m


def test_training_lowers_the_loss_and_writes_a_run(tiny_reference: Path, tmp_path: Path) -> None:
    cfg = config(tiny_reference, tmp_path / "run", max_steps=150, lr_initial=3e-3)
    cfg.run.plots = True
    trainer = Trainer(cfg)
    before, m0 = training_set_loss(trainer)
    summary = trainer.train()
    after, m1 = training_set_loss(trainer)
    assert after < 0.9 * before
    assert m1["force_l2mae"] < 0.95 * m0["force_l2mae"] and m1["energy_mae_per_atom"] < 0.5 * m0["energy_mae_per_atom"]
    assert len(_csv(tmp_path / "run" / "logs" / "train.csv")) == 150
    for name in ("checkpoints/last.pt", "checkpoints/best.pt", "plots/parity_val.png", "plots/learning_curves.png",
                 "logs/val.csv", "summary.json", "config.yaml"):
        assert (tmp_path / "run" / name).exists(), name
    assert list((tmp_path / "run" / "logs" / "tensorboard").iterdir())
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    assert "trainer_state" not in best and best["ema_state_dict"] is not None  # an exported model
    model = load_model(tmp_path / "run" / "checkpoints" / "best.pt")  # EMA weights by default
    assert torch.equal(model.element_energies[8], torch.tensor(best["statistics"]["element_energies"]["8"], dtype=torch.float32))
    assert summary["final_val"]["num_structures"] == 5


def _csv(path: Path) -> list[dict]:
    import csv

    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_reference: Path, tmp_path: Path, monkeypatch) -> None:
    """Stop after 5 of 12 steps (random edge rolls, 2 epochs, EMA), resume: identical result."""
    Trainer(config(tiny_reference, tmp_path / "straight")).train()

    interrupted = Trainer(config(tiny_reference, tmp_path / "resumed"))
    original = interrupted._train_step

    def stop_after_five(indices, batch, **kwargs):  # noqa: ANN001 - as a Ctrl-C would, between steps
        original(indices, batch, **kwargs)
        if interrupted.step == 5:
            interrupted._stop_requested = True

    monkeypatch.setattr(interrupted, "_train_step", stop_after_five)
    assert interrupted.train() == {"stopped_at_step": 5}
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["trainer_state"]["step"] == 5
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(config(tiny_reference, tmp_path / "resumed"))
    Trainer(config(tiny_reference, tmp_path / "resumed"), resume=True).train()

    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert a["trainer_state"]["step"] == b["trainer_state"]["step"] == 12
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
        assert torch.equal(a["ema_state_dict"][key], b["ema_state_dict"][key]), key


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tiny_reference: Path, tmp_path: Path, monkeypatch) -> None:
    trainer = Trainer(config(tiny_reference, tmp_path / "run", checkpoint_every=2))
    original = trainer.forward_backward

    def poisoned(batch):  # noqa: ANN001
        if trainer.step == 5:
            with torch.no_grad():
                trainer.model.energy_scale.fill_(float("nan"))
        return original(batch)

    monkeypatch.setattr(trainer, "forward_backward", poisoned)
    with pytest.raises(TrainingDiverged, match=r"non-finite loss at step 5 \(epoch 1, batch 1: structures \[.*\] of .*train\.extxyz\).*last good checkpoint"):
        trainer.train()
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["trainer_state"]["step"] == 4
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


DDP_SCRIPT = r"""
import json, sys, torch
from spherical_channels.training import TrainConfig, Trainer
from spherical_channels.training.trainer import collate
cfg = TrainConfig.from_dict(json.loads(sys.argv[1]))
trainer = Trainer(cfg)
rank, world = trainer.ctx.rank, trainer.ctx.world_size
indices = list(range(4))[rank * 4 // world:(rank + 1) * 4 // world]   # this rank's share of one global batch
_, batch = collate([(i, trainer.train_data[i]) for i in indices], dtype=torch.float64)
trainer.forward_backward(batch)
if rank == 0:
    torch.save({k: p.grad for k, p in trainer.model.named_parameters() if p.grad is not None}, sys.argv[2])
trainer.close()
"""


def test_two_processes_give_the_gradients_of_one(tiny_reference: Path, tmp_path: Path) -> None:
    """torchrun with 2 CPU processes (gloo) over a global batch of 4 structures split 2 + 2,
    against one process over all 4: the same gradients (float64, fixed edge rolls)."""
    cfg = config(tiny_reference, tmp_path / "unused").to_dict()
    cfg["model"]["roll"] = "fixed"
    cfg["run"]["dtype"] = "float64"
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = {}
    for procs in (1, 2):
        cfg["run"]["output_dir"] = str(tmp_path / f"run{procs}")
        out = tmp_path / f"grads{procs}.pt"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
               str(script), json.dumps(cfg), str(out)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
        results[procs] = torch.load(out, weights_only=True)
    assert results[1].keys() == results[2].keys() and len(results[1]) > 10
    for key in results[1]:
        torch.testing.assert_close(results[2][key], results[1][key], rtol=1e-9, atol=1e-12, msg=key)


def test_bf16_mixed_precision_training_on_cpu(tiny_reference: Path, tmp_path: Path) -> None:
    trainer = Trainer(config(tiny_reference, tmp_path / "run", max_steps=4, amp="bf16"))
    summary = trainer.train()
    assert summary["steps"] == 4 and math.isfinite(summary["final_val"]["force_mae"])
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in trainer.model.parameters())

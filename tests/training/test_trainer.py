"""The training loop end to end on tiny EMT data: learning, resuming, callbacks, NaN handling,
mixed precision, many processes."""

from __future__ import annotations

import time

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from training_helpers import Crash, CrashAt, make_config, read_csv

from spherical_channels.data.formats.common import DataError
from spherical_channels.models.checkpoint import load_model, read_checkpoint
from spherical_channels.training import (
    Callback,
    RunDirectoryError,
    Trainer,
    TrainingDiverged,
    TrainingInterrupted,
)


def training_set_loss(trainer: Trainer) -> tuple[float, dict]:
    """The training loss over the whole training set (EMA weights, deterministic roll)."""
    m = trainer.validate(trainer.train_data)
    optim = trainer.config.optim
    loss = (optim.energy_coefficient * m["energy_mae"] + optim.force_coefficient * m["force_l2mae"]) / trainer.force_scale
    return loss, m


def test_training_lowers_the_loss_and_writes_a_run(tiny_reference: Path, tmp_path: Path) -> None:
    cfg = make_config(tiny_reference, tmp_path / "run", max_steps=150, lr_initial=3e-3)
    cfg.run.plots = True
    trainer = Trainer(cfg)
    before, m0 = training_set_loss(trainer)
    summary = trainer.train()
    after, m1 = training_set_loss(trainer)
    assert after < 0.9 * before
    assert m1["force_l2mae"] < 0.95 * m0["force_l2mae"] and m1["energy_mae_per_atom"] < 0.5 * m0["energy_mae_per_atom"]
    assert [int(r["step"]) for r in read_csv(tmp_path / "run" / "logs" / "train.csv")] == list(range(1, 151))
    for name in ("checkpoints/last.pt", "checkpoints/best.pt", "plots/parity_val.png", "plots/learning_curves.png",
                 "logs/val.csv", "summary.json", "config.yaml"):
        assert (tmp_path / "run" / name).exists(), name
    assert not (tmp_path / "run" / ".lock").exists()  # released when the run ended
    assert list((tmp_path / "run" / "logs" / "tensorboard").iterdir())
    best = read_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    assert "trainer_state" not in best and best["ema_state_dict"] is not None  # an exported model
    model = load_model(tmp_path / "run" / "checkpoints" / "best.pt")  # EMA weights by default
    assert torch.equal(model.element_energies[8], torch.tensor(best["statistics"]["element_energies"]["8"], dtype=torch.float32))
    assert summary["final_val"]["num_structures"] == 5
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 150


def _tensorboard_steps(logs: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logs / "tensorboard"))
    events.Reload()  # applies the purge a resumed run's writer records
    return [e.step for e in events.Scalars(tag)]


def test_resume_after_a_crash_equals_an_uninterrupted_run_and_logs_each_step_once(config_for) -> None:  # noqa: ANN001
    """A run dies at step 7, its last checkpoint from step 4 (random edge rolls, EMA, an epoch
    boundary at step 4): resuming drops the log rows of steps 5-7, removes the partial checkpoint
    a kill during a save leaves, and ends with the weights of an uninterrupted run."""
    Trainer(config_for("straight", checkpoint_every=4)).train()

    crashed = Trainer(config_for("resumed", checkpoint_every=4), callbacks=[CrashAt(7)])
    with pytest.raises(Crash):
        crashed.train()
    run = crashed.run
    assert read_checkpoint(run.last_checkpoint)["trainer_state"]["step"] == 4
    assert len(read_csv(run.logs / "train.csv")) == 7  # rows 5-7 are after the checkpoint
    stale = run.checkpoints / ".last.pt.k2j4x8.tmp"  # what a kill during save_checkpoint leaves
    stale.write_bytes(b"partial")

    with pytest.raises(RunDirectoryError, match="--resume"):
        Trainer(config_for("resumed", checkpoint_every=4))
    # TensorBoard reads a directory's event files in name order, and the names start with the
    # whole second they were created in (then a counter that sorts as text): a resume within
    # the same second as the crash could be read first. Real resumes are seconds apart.
    started = int(time.time())
    while int(time.time()) == started:
        time.sleep(0.05)
    resumed = Trainer(config_for("resumed", checkpoint_every=4), resume=True)
    assert resumed.resumed_from == 4 and not stale.exists()
    resumed.train()

    a = read_checkpoint(Path(config_for("straight").run.output_dir) / "checkpoints" / "last.pt")
    b = read_checkpoint(run.last_checkpoint)
    assert a["trainer_state"]["step"] == b["trainer_state"]["step"] == 12
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
        assert torch.equal(a["ema_state_dict"][key], b["ema_state_dict"][key]), key
    rows = read_csv(run.logs / "train.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 13))
    straight_rows = read_csv(Path(config_for("straight").run.output_dir) / "logs" / "train.csv")
    assert [r["loss"] for r in rows] == [r["loss"] for r in straight_rows]  # the same steps, logged once
    assert _tensorboard_steps(run.logs, "train/loss") == list(range(1, 13))
    assert [int(r["step"]) for r in read_csv(run.logs / "val.csv")] == [4, 8, 12]  # epoch ends, final


class Interrupt(Callback):
    """Sends this process ``signum`` after step ``step`` (as Ctrl-C or a scheduler would)."""

    def __init__(self, step: int, signum: int = signal.SIGINT, times: int = 1) -> None:
        self.step, self.signum, self.times = step, signum, times

    def on_step_end(self, trainer, result) -> None:  # noqa: ANN001
        if result.step == self.step:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)


def test_a_signal_saves_the_step_and_ends_with_its_exit_code(config_for) -> None:  # noqa: ANN001
    trainer = Trainer(config_for("run"), callbacks=[Interrupt(3, signal.SIGINT)])
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match=r"SIGINT received: stopped at step 3, saved in .*last\.pt; continue with: scn train CONFIG --resume") as info:
        trainer.train()
    assert info.value.exit_code == 130 and info.value.saved and info.value.step == 3
    assert read_checkpoint(trainer.run.last_checkpoint)["trainer_state"]["step"] == 3
    assert signal.getsignal(signal.SIGINT) is previous  # handlers restored
    assert not (trainer.run.path / "summary.json").exists()  # not a finished run

    twice = Trainer(config_for("twice"), callbacks=[Interrupt(2, signal.SIGTERM, times=2)])
    with pytest.raises(TrainingInterrupted, match="SIGTERM again: stopped at once") as info:
        twice.train()
    assert info.value.exit_code == 143 and not info.value.saved
    assert not twice.run.last_checkpoint.exists()


class Recorder(Callback):
    """Records the hooks called, and stops the run normally after ``stop_at`` steps."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.stop_at = stop_at
        self.calls: list[tuple] = []

    def on_train_start(self, trainer) -> None:  # noqa: ANN001
        self.calls.append(("train_start", trainer.state.step))

    def on_epoch_start(self, trainer) -> None:  # noqa: ANN001
        self.calls.append(("epoch_start", trainer.state.epoch))

    def on_step_end(self, trainer, result) -> None:  # noqa: ANN001
        assert result.step == trainer.state.step and len(result.indices) == result.num_structures
        assert math.isfinite(result.loss) and result.lr > 0
        self.calls.append(("step", result.step))
        if result.step == self.stop_at:
            trainer.request_stop("enough")

    def on_epoch_end(self, trainer) -> None:  # noqa: ANN001
        self.calls.append(("epoch_end", trainer.state.epoch))

    def on_validation_end(self, trainer, metrics, improved, final) -> None:  # noqa: ANN001
        self.calls.append(("validation", trainer.state.step, final, improved == (trainer.state.best["step"] == trainer.state.step)))

    def on_train_end(self, trainer, summary) -> None:  # noqa: ANN001
        self.calls.append(("train_end", summary["steps"]))


def test_callbacks_see_every_step_and_can_end_the_run(config_for) -> None:  # noqa: ANN001
    recorder = Recorder(stop_at=6)
    summary = Trainer(config_for("run"), callbacks=[recorder]).train()
    assert recorder.calls == [
        ("train_start", 0), ("epoch_start", 0), ("step", 1), ("step", 2), ("step", 3), ("step", 4),
        ("epoch_end", 1), ("validation", 4, False, True), ("epoch_start", 1), ("step", 5), ("step", 6),
        ("validation", 6, True, True), ("train_end", 6),
    ]
    assert summary["steps"] == 6 and summary["stopped"] == "enough"
    run = Path(config_for("run").run.output_dir)
    assert json.loads((run / "summary.json").read_text())["stopped"] == "enough"
    assert read_checkpoint(run / "checkpoints" / "last.pt")["trainer_state"]["step"] == 6


def test_a_run_killed_before_its_first_checkpoint_is_not_reused_silently(config_for) -> None:  # noqa: ANN001
    with pytest.raises(Crash):
        Trainer(config_for("run"), callbacks=[CrashAt(2)]).train()
    run = Path(config_for("run").run.output_dir)
    first_config = (run / "config.yaml").read_text()
    assert len(read_csv(run / "logs" / "train.csv")) == 2 and not (run / "checkpoints" / "last.pt").exists()

    with pytest.raises(RunDirectoryError, match=r"not empty \(config\.yaml, logs\) but holds no checkpoint.*--overwrite"):
        Trainer(config_for("run", lr_initial=1e-3))
    with pytest.raises(RunDirectoryError, match=r"nothing to resume.*--overwrite"):
        Trainer(config_for("run"), resume=True)
    assert (run / "config.yaml").read_text() == first_config  # untouched by the refused runs

    Trainer(config_for("run", lr_initial=1e-3, max_steps=3), overwrite=True).train()
    assert [int(r["step"]) for r in read_csv(run / "logs" / "train.csv")] == [1, 2, 3]  # the new run's rows only
    assert "0.001" in (run / "config.yaml").read_text()


def test_the_run_directory_is_locked_while_a_trainer_uses_it(config_for) -> None:  # noqa: ANN001
    first = Trainer(config_for("run", max_steps=1))
    with pytest.raises(RunDirectoryError, match="in use by another training process"):
        Trainer(config_for("run", max_steps=1), overwrite=True)
    first.train()  # releases the directory at the end
    with Trainer(config_for("run", max_steps=2), resume=True) as again:
        assert again.state.step == 1


class PoisonTargets(Callback):
    """At step ``step``, sets the target forces of the batch's structure ``position`` to ``value``."""

    def __init__(self, step: int, position: int, value: float) -> None:
        self.step, self.position, self.value = step, position, value
        self.index: int | None = None

    def on_batch_start(self, trainer, batch) -> None:  # noqa: ANN001
        if trainer.state.step == self.step:
            atoms = batch.batch.batch == self.position
            batch.batch.forces[atoms] = self.value
            self.index = batch.indices[self.position]


def test_a_non_finite_target_names_its_structure(config_for) -> None:  # noqa: ANN001
    """NaN target forces of one structure of the batch: that structure is named, by its index in
    the training set (whichever check meets it first: the model's input check or the loss)."""
    poison = PoisonTargets(step=5, position=1, value=float("nan"))
    trainer = Trainer(config_for("run", checkpoint_every=2), callbacks=[poison])
    with pytest.raises((DataError, TrainingDiverged)) as info:
        trainer.train()
    message, path = str(info.value), trainer.config.train.path
    assert poison.index != poison.position  # the data set index, not the place in the batch, is named
    named = (f"{path}: structure {poison.index}: non-finite", f"structure {poison.index} (non-finite target forces) of {path}")
    assert any(text in message for text in named), message
    assert "step 5" in message and f"the last good checkpoint is {trainer.run.last_checkpoint}" in message, message
    assert read_checkpoint(trainer.run.last_checkpoint)["trainer_state"]["step"] == 4


def test_an_overflowing_loss_names_the_structure_that_caused_it(config_for) -> None:  # noqa: ANN001
    """Target forces of 3e38 eV/A (finite in float32) in one structure: the loss overflows; the
    structure with the largest error is named, not the whole batch."""
    poison = PoisonTargets(step=5, position=1, value=3e38)
    trainer = Trainer(config_for("run", checkpoint_every=2), callbacks=[poison])
    with pytest.raises(TrainingDiverged) as info:
        trainer.train()
    message = str(info.value)
    assert poison.index != poison.position
    assert message.startswith("non-finite loss at step 5 (epoch 1, batch 1): the loss overflowed float32: "
                              f"structure {poison.index} of {trainer.config.train.path} contributes most (energy error"), message
    assert message.endswith(f"training stopped, the last good checkpoint is {trainer.run.last_checkpoint}")
    last = read_checkpoint(trainer.run.last_checkpoint)
    assert last["trainer_state"]["step"] == 4
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


class PoisonWeights(Callback):
    """At step 3, one weight of the energy head becomes NaN (a diverged model)."""

    def on_batch_start(self, trainer, batch) -> None:  # noqa: ANN001
        if trainer.state.step == 3:
            with torch.no_grad():
                trainer.model.energy_head[0].weight[0, 0] = float("nan")


def test_diverged_weights_are_blamed_not_the_structures(config_for) -> None:  # noqa: ANN001
    trainer = Trainer(config_for("run"), callbacks=[PoisonWeights()])
    with pytest.raises(TrainingDiverged, match=r"at step 3 .*: the model's weights are not finite \(\[energy_head\.0\.weight\]\), so no prediction is") as info:
        trainer.train()
    assert "no checkpoint was written yet" in str(info.value)


def test_fp16_loss_scaling_skips_overflowing_steps_instead_of_stopping(config_for) -> None:  # noqa: ANN001
    """What GradScaler does on a GPU (fp16), with its CPU implementation: gradients that
    overflow skip the update and halve the scale; without a scaler they stop the run."""
    trainer = Trainer(config_for("run"))
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    trainer.scaler.scale(torch.ones(()))  # initialises the scale, as the first backward would
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    for p in trainer.model.parameters():
        p.grad = torch.full_like(p, float("inf"))
    lr, skipped = trainer.optimizer_step([0, 1])
    assert skipped and lr > 0 and trainer.scaler.get_scale() == 512.0
    assert all(torch.equal(v, weights[k]) for k, v in trainer.model.state_dict().items())
    assert trainer.ema.num_updates == 0
    for p in trainer.model.parameters():
        p.grad = torch.ones_like(p)
    trainer.scaler.scale(torch.ones(()))
    assert trainer.optimizer_step([0, 1]) == (lr, False)
    assert trainer.ema.num_updates == 1
    name, first = next(iter(trainer.model.named_parameters()))
    assert not torch.equal(first, weights[name])  # this step was taken

    trainer.scaler = None
    for p in trainer.model.parameters():
        p.grad = torch.full_like(p, float("inf"))
    with pytest.raises(TrainingDiverged, match=r"non-finite gradient norm \(inf\): the batch held structures \[3, 4\] of .*train\.extxyz"):
        trainer.optimizer_step([3, 4])


def test_batches_come_with_the_models_graph(config_for) -> None:  # noqa: ANN001
    """The collate builds the graph (in the workers: here one worker process); the model's
    output with that graph is the one it computes building the graph itself."""
    from spherical_channels.data.neighbors import build_graph

    trainer = Trainer(config_for("run", num_workers=1))
    item = next(iter(trainer.loader(trainer.train_data, [0, 5, 9], batch_size=3)))
    assert item.indices == [0, 5, 9] and item.error is None and item.graph.num_edges > 0
    expected = build_graph(item.batch, trainer.model.config.cutoff, trainer.model.config.max_num_neighbors)
    assert torch.equal(item.graph.edge_index, expected.edge_index) and torch.equal(item.graph.cell_offsets, expected.cell_offsets)
    trainer.model.eval()
    with_graph = trainer.model(item.batch, graph=item.graph)
    without = trainer.model(item.batch)
    assert torch.equal(with_graph["energy"], without["energy"]) and torch.equal(with_graph["forces"], without["forces"])


DDP_SCRIPT = r"""
import json, os, signal, sys, torch
from spherical_channels.training import Callback, TrainConfig, Trainer, TrainingInterrupted
from spherical_channels.models.checkpoint import read_checkpoint

class TermOnRankOne(Callback):  # a signal that reaches one process only
    def on_step_end(self, trainer, result):
        if trainer.ctx.rank == 1 and result.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

cfg = TrainConfig.from_dict(json.loads(sys.argv[1]))
trainer = Trainer(cfg, callbacks=[TermOnRankOne()])
rank, world = trainer.ctx.rank, trainer.ctx.world_size
indices = list(range(4))[rank * 4 // world:(rank + 1) * 4 // world]   # this rank's share of one global batch
item = trainer.collate([(i, trainer.train_data[i]) for i in indices])
trainer.forward_backward(item.batch, item.graph, indices=item.indices)
if rank == 0:
    torch.save({k: p.grad for k, p in trainer.model.named_parameters() if p.grad is not None}, sys.argv[2])
if world == 2:  # both processes stop after step 2 and save it together
    try:
        trainer.train()
    except TrainingInterrupted as err:
        assert err.exit_code == 143 and err.step == 2, err
    else:
        raise AssertionError("not stopped")
    if rank == 0:
        assert read_checkpoint(trainer.run.last_checkpoint)["trainer_state"]["step"] == 2
trainer.close()
"""


def test_two_processes_give_the_gradients_of_one(tiny_reference: Path, tmp_path: Path) -> None:
    """torchrun with 2 CPU processes (gloo) over a global batch of 4 structures split 2 + 2,
    against one process over all 4: the same gradients (float64, fixed edge rolls). Then a
    SIGTERM to one of the 2 processes stops both after the same step, with one checkpoint."""
    cfg = make_config(tiny_reference, tmp_path / "unused").to_dict()
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
        assert not (tmp_path / f"run{procs}" / ".lock").exists()  # released by close()
    assert results[1].keys() == results[2].keys() and len(results[1]) > 10
    for key in results[1]:
        torch.testing.assert_close(results[2][key], results[1][key], rtol=1e-9, atol=1e-12, msg=key)


def test_bf16_mixed_precision_training_on_cpu(config_for) -> None:  # noqa: ANN001
    trainer = Trainer(config_for("run", max_steps=4, amp="bf16"))
    summary = trainer.train()
    assert summary["steps"] == 4 and math.isfinite(summary["final_val"]["force_mae"])
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in trainer.model.parameters())


def test_new_models_get_the_zbl_prior_unless_the_config_says_otherwise(config_for) -> None:
    from spherical_channels.training.config import TrainConfig

    with Trainer(config_for("default")) as trainer:
        assert trainer.model.config.zbl is True
    off = config_for("off").to_dict()
    off["model"]["zbl"] = False
    with Trainer(TrainConfig.from_dict(off)) as trainer:
        assert trainer.model.config.zbl is False


def test_a_smooth_model_trains_on_its_own_uncapped_graph(config_for) -> None:
    """The DataLoader workers build the graph the model itself builds: for the smooth variant,
    every pair within the cutoff (no cap)."""
    from spherical_channels.training.config import TrainConfig

    raw = config_for("smooth").to_dict()
    raw["model"].update(smooth=True, max_num_neighbors=4, cutoff=5.0)
    with Trainer(TrainConfig.from_dict(raw)) as trainer:
        items = [(i, trainer.train_data[i]) for i in range(3)]
        batch = trainer.collate(items)
        own = trainer.model.build_graph(batch.batch)
        assert torch.equal(batch.graph.edge_index, own.edge_index)
        assert int(torch.bincount(own.edge_index[1]).max()) > 4  # the cap was not applied


def test_compiled_blocks_train_as_the_eager_model(config_for) -> None:  # noqa: ANN001
    """run.compile: the same losses as eager (aot_eager captures the graphs without code
    generation, which keeps this test fast), the checkpoint's names unchanged."""
    from spherical_channels.training.config import TrainConfig

    losses = {}
    for backend in (None, "aot_eager"):
        raw = config_for(f"c{backend}", max_steps=3).to_dict()
        raw["model"].update(num_interactions=1)
        raw["run"]["compile"] = backend
        with Trainer(TrainConfig.from_dict(raw)) as trainer:
            trainer.train()
            losses[backend] = [float(row["loss"]) for row in read_csv(trainer.run.logs / "train.csv")]
            names = set(trainer.model.state_dict())
    assert len(losses[None]) == 3
    np.testing.assert_allclose(losses["aot_eager"], losses[None], rtol=1e-5)
    assert not any("_orig_mod" in name for name in names)


def test_compile_refuses_energy_conserving_models(config_for) -> None:  # noqa: ANN001
    from spherical_channels.training.config import ConfigError, TrainConfig

    raw = config_for("cons").to_dict()
    raw["model"]["direct_forces"] = False
    raw["run"]["compile"] = "aot_eager"
    with pytest.raises(ConfigError, match="double backward"):
        Trainer(TrainConfig.from_dict(raw))

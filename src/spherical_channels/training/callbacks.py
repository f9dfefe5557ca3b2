"""What the training loop does around its steps, as callbacks.

The loop (:meth:`~.trainer.Trainer.train`) calls these hooks of every callback, in list order,
on every process (callbacks that log or save reduce over processes or act on the main one only):

``on_train_start(trainer)``
    before the first step (also of a resumed run).
``on_epoch_start(trainer)`` / ``on_epoch_end(trainer)``
    around each epoch's batches (a resumed run starts mid-epoch; the epoch in which the run
    reaches its last step, or stops, does not end).
``on_batch_start(trainer, batch)``
    a :class:`~.data.TrainingBatch` on the device, before its step (it may be inspected or
    changed).
``on_step_end(trainer, result)``
    after an optimiser step (:class:`StepResult`); ``trainer.state.step`` counts it.
``on_validation_start(trainer, final)`` / ``on_validation_batch(trainer, batch, prediction, final)``
/ ``on_validation_end(trainer, metrics, improved, final)``
    around a validation pass (``final``: the one after the last step; ``improved``: the best
    validation force MAE so far, already in ``trainer.state.best``).
``on_stop(trainer, request)``
    the loop stopped on a :class:`StopRequest` with an exit code (a signal): the run is about
    to end with :class:`~.errors.TrainingInterrupted`.
``on_train_end(trainer, summary)``
    after the final validation; ``summary`` is what ``train()`` returns.
``on_exception(trainer, error)``
    an exception (a :class:`~.errors.TrainingInterrupted` too) is leaving ``train()``: release
    what the callback holds. Errors raised here are reported as warnings, not raised.

A callback asks the run to stop with ``trainer.request_stop(reason, exit_code=None)``: without an
exit code the run ends as a finished one (final validation, summary); with one, it saves
``last.pt`` and raises :class:`~.errors.TrainingInterrupted`.
"""

from __future__ import annotations

import signal
import sys
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .distributed import all_reduce_sum
from .errors import TrainingInterrupted
from .logs import RunLogger, read_log

if TYPE_CHECKING:
    from .config import TrainConfig
    from .data import TrainingBatch
    from .trainer import Trainer

__all__ = [
    "Callback",
    "CallbackList",
    "Checkpointing",
    "MetricsLogger",
    "Plots",
    "ProgressBar",
    "StepResult",
    "StopOnSignal",
    "StopRequest",
    "TimeBudget",
    "default_callbacks",
]


@dataclass
class StepResult:
    """One optimiser step, as ``on_step_end`` sees it (this process's batch)."""

    step: int  # steps taken, this one included
    indices: list[int]  # the batch's structures (indices in the training set)
    num_structures: int
    loss: float
    energy_mae: float  # eV
    force_l2mae: float  # eV/A
    lr: float
    step_seconds: float  # forward, backward and optimiser step
    data_seconds: float  # waiting for the batch
    skipped: bool = False  # fp16: the loss scaler skipped the update (overflowing gradients)


@dataclass
class StopRequest:
    """Why the run should stop after the current step; ``exit_code`` None: a normal end."""

    reason: str
    exit_code: int | None = None


class Callback:
    """Base class: every hook does nothing (see the module docstring for when each runs)."""

    def on_train_start(self, trainer: "Trainer") -> None:
        pass

    def on_epoch_start(self, trainer: "Trainer") -> None:
        pass

    def on_batch_start(self, trainer: "Trainer", batch: "TrainingBatch") -> None:
        pass

    def on_step_end(self, trainer: "Trainer", result: StepResult) -> None:
        pass

    def on_epoch_end(self, trainer: "Trainer") -> None:
        pass

    def on_validation_start(self, trainer: "Trainer", final: bool) -> None:
        pass

    def on_validation_batch(
        self, trainer: "Trainer", batch: "TrainingBatch", prediction: dict[str, torch.Tensor], final: bool
    ) -> None:
        pass

    def on_validation_end(self, trainer: "Trainer", metrics: dict[str, float], improved: bool, final: bool) -> None:
        pass

    def on_stop(self, trainer: "Trainer", request: StopRequest) -> None:
        pass

    def on_train_end(self, trainer: "Trainer", summary: dict[str, Any]) -> None:
        pass

    def on_exception(self, trainer: "Trainer", error: BaseException) -> None:
        pass


class CallbackList:
    """Callbacks called in order; ``call("on_step_end", trainer, result)`` calls that hook of each."""

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks = list(callbacks)

    def __iter__(self):  # noqa: ANN204
        return iter(self.callbacks)

    def __len__(self) -> int:
        return len(self.callbacks)

    def append(self, callback: Callback) -> None:
        self.callbacks.append(callback)

    def find(self, kind: type) -> Callback | None:
        """The first callback of type ``kind``, or None."""
        return next((c for c in self.callbacks if isinstance(c, kind)), None)

    def call(self, hook: str, *args: Any) -> None:
        if hook == "on_exception":
            for callback in self.callbacks:
                try:
                    callback.on_exception(*args)
                except Exception as err:  # noqa: BLE001 - the original error is the one to report
                    warnings.warn(f"{type(callback).__name__}.on_exception failed: {err}", stacklevel=2)
            return
        for callback in self.callbacks:
            getattr(callback, hook)(*args)


# ---------------------------------------------------------------------------- built-in callbacks
class StopOnSignal(Callback):
    """First SIGINT (Ctrl-C) / SIGTERM: finish the current step, save ``last.pt``, end with
    :class:`~.errors.TrainingInterrupted` (exit code 128 + signal). Second: stop at once,
    without saving. Handlers are installed for the duration of ``train()`` (main thread only)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}

    def on_train_start(self, trainer: "Trainer") -> None:
        def handler(signum: int, frame: Any) -> None:  # noqa: ARG001
            name = signal.Signals(signum).name
            request = trainer.stop_request
            if request is not None and request.exit_code is not None:
                raise TrainingInterrupted(
                    f"{name} again: stopped at once at step {trainer.state.step}, without saving; "
                    f"{trainer.kept_checkpoint()}",
                    exit_code=128 + signum,
                    step=trainer.state.step,
                    saved=False,
                )
            trainer.request_stop(f"{name} received", exit_code=128 + signum)
            if trainer.is_main:
                print(f"\n{name}: stopping after this step and saving a checkpoint ({name} again: stop at once, "
                      "without saving)", file=sys.stderr, flush=True)

        try:
            self._previous = {s: signal.signal(s, handler) for s in self.SIGNALS}
        except ValueError:  # not the main thread: no signal handling
            self._previous = {}

    def _restore(self) -> None:
        previous, self._previous = self._previous, {}
        for s, h in previous.items():
            signal.signal(s, h)

    def on_train_end(self, trainer: "Trainer", summary: dict[str, Any]) -> None:
        self._restore()

    def on_exception(self, trainer: "Trainer", error: BaseException) -> None:
        self._restore()


class TimeBudget(Callback):
    """Caps the run's length (``trainer.total_steps``, and a cosine schedule with it) to what
    fits in ``minutes`` of wall clock, timed over steps 3-22 of the run (the first ones include
    start-up costs); a tenth of the budget is set aside for validation."""

    CALIBRATION_STEPS = 20

    def __init__(self, minutes: float) -> None:
        self.minutes = minutes
        self._start = self._clock = 0.0
        self._first_step = 0

    def on_train_start(self, trainer: "Trainer") -> None:
        self._start = time.perf_counter()
        self._first_step = trainer.state.step

    def on_step_end(self, trainer: "Trainer", result: StepResult) -> None:
        done = trainer.state.step - self._first_step
        if done == 2:
            self._clock = time.perf_counter()
        if done != 2 + self.CALIBRATION_STEPS:
            return
        per_step = (time.perf_counter() - self._clock) / self.CALIBRATION_STEPS
        remaining = 0.9 * self.minutes * 60.0 - (time.perf_counter() - self._start)
        steps = trainer.state.step + int(max(0.0, remaining) / per_step)
        ctx = trainer.ctx
        steps = int(all_reduce_sum(torch.tensor([steps], dtype=torch.float64), ctx).item() / ctx.world_size)
        if steps < trainer.total_steps:
            trainer.total_steps = steps
            if trainer.is_main:
                print(f"time budget: {per_step:.3f} s per step, training for {steps} steps")


class MetricsLogger(Callback):
    """Training rows (averages over the steps since the last row and over processes) every
    ``every`` steps and at the last step, and every validation, to ``logs/*.csv`` and
    TensorBoard (main process). Rows the run's directory holds beyond the step the run starts
    at (written after the checkpoint a run resumes from) are dropped first."""

    def __init__(self, every: int = 10, tensorboard: bool = True) -> None:
        self.every = max(1, int(every))
        self.tensorboard = tensorboard
        self.logger: RunLogger | None = None
        self.latest: dict[str, float] = {}
        self._rows: list[tuple[float, ...]] = []

    def on_train_start(self, trainer: "Trainer") -> None:
        self._rows = []
        if not trainer.is_main:
            return
        step = trainer.state.step
        self.logger = RunLogger(trainer.run.logs, tensorboard=self.tensorboard, resume_step=step if step else None)
        dropped = sum(self.logger.dropped.values())
        if dropped:
            print(f"resume: dropped {dropped} log row(s) written after step {step} (the checkpoint's) by the "
                  "interrupted run")

    def on_step_end(self, trainer: "Trainer", result: StepResult) -> None:
        self._rows.append((result.loss, result.energy_mae, result.force_l2mae, result.num_structures,
                           result.step_seconds, result.data_seconds))
        step = trainer.state.step
        if step % self.every == 0 or step >= trainer.total_steps:
            self._log(trainer, result.lr)

    def _log(self, trainer: "Trainer", lr: float) -> None:
        rows, self._rows = self._rows, []
        if not rows:
            return
        ctx = trainer.ctx
        sums = all_reduce_sum(torch.tensor(rows, dtype=torch.float64).sum(0), ctx)
        n = len(rows) * ctx.world_size
        step_seconds, data_seconds = float(sums[4]) / n, float(sums[5]) / n
        values = {
            "loss": float(sums[0]) / n,
            "energy_mae": float(sums[1]) / n,
            "force_l2mae": float(sums[2]) / n,
            "lr": lr,
            "epoch": trainer.state.epoch,
            # throughput of the whole loop (data included); the share of it spent waiting for data
            "structures_per_s": float(sums[3]) / max((step_seconds + data_seconds) * n / ctx.world_size, 1e-9),
            "step_seconds": step_seconds,
            "data_seconds": data_seconds,
            "data_share": data_seconds / max(step_seconds + data_seconds, 1e-12),
        }
        self.latest = values
        if self.logger is not None:
            self.logger.log("train", trainer.state.step, values)

    def on_validation_end(self, trainer: "Trainer", metrics: dict[str, float], improved: bool, final: bool) -> None:
        if metrics and self.logger is not None:
            self.logger.log("val", trainer.state.step, {**metrics, "epoch": trainer.state.epoch})

    def _close(self) -> None:
        if self.logger is not None:
            self.logger.close()
            self.logger = None

    def on_train_end(self, trainer: "Trainer", summary: dict[str, Any]) -> None:
        self._close()

    def on_exception(self, trainer: "Trainer", error: BaseException) -> None:
        self._close()


class ProgressBar(Callback):
    """A tqdm bar per epoch (main process) with the step's loss and learning rate."""

    def __init__(self) -> None:
        self._bar: Any = None

    def on_epoch_start(self, trainer: "Trainer") -> None:
        self._close()
        if not trainer.is_main:
            return
        from tqdm import tqdm

        total = max(0, trainer.steps_per_epoch - trainer.state.batch_in_epoch)
        self._bar = tqdm(total=total, desc=f"epoch {trainer.state.epoch}", unit="batch", leave=False)

    def on_step_end(self, trainer: "Trainer", result: StepResult) -> None:
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{result.loss:.3g}", lr=f"{result.lr:.2g}", refresh=False)

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def on_epoch_end(self, trainer: "Trainer") -> None:
        self._close()

    def on_stop(self, trainer: "Trainer", request: StopRequest) -> None:
        self._close()

    def on_train_end(self, trainer: "Trainer", summary: dict[str, Any]) -> None:
        self._close()

    def on_exception(self, trainer: "Trainer", error: BaseException) -> None:
        self._close()


class Checkpointing(Callback):
    """``last.pt`` every ``every`` steps (when no validation follows the step, which saves
    anyway), after every validation and when the run is stopped by a signal; ``best.pt`` (an
    exported model: no trainer state) when validation force MAE improved, or at the end of a
    run that never validated."""

    def __init__(self, every: int | None = None) -> None:
        self.every = every

    def on_step_end(self, trainer: "Trainer", result: StepResult) -> None:
        if self.every and trainer.state.step % self.every == 0 and not trainer.validation_due():
            trainer.save("last.pt")

    def on_validation_end(self, trainer: "Trainer", metrics: dict[str, float], improved: bool, final: bool) -> None:
        trainer.save("last.pt", metrics)
        if improved:
            trainer.save("best.pt", metrics, trainer_state=False)

    def on_stop(self, trainer: "Trainer", request: StopRequest) -> None:
        trainer.save("last.pt")

    def on_train_end(self, trainer: "Trainer", summary: dict[str, Any]) -> None:
        if trainer.is_main and not trainer.run.best_checkpoint.exists():
            trainer.save("best.pt", summary.get("final_val") or {}, trainer_state=False)


class Plots(Callback):
    """At the end: parity plots of the final validation (this process's share) and learning
    curves from the logs, in ``plots/`` (main process). A plot that fails is a warning: the
    run itself is complete."""

    def __init__(self) -> None:
        self._parity: list[list[torch.Tensor]] | None = None

    def on_validation_start(self, trainer: "Trainer", final: bool) -> None:
        self._parity = [[] for _ in range(5)] if final and trainer.is_main else None

    def on_validation_batch(
        self, trainer: "Trainer", batch: "TrainingBatch", prediction: dict[str, torch.Tensor], final: bool
    ) -> None:
        if self._parity is None or "forces" not in prediction:
            return
        b = batch.batch
        free = ~b.fixed
        values = (prediction["energy"], b.energy, b.natoms, prediction["forces"][free], b.forces[free])
        for store, value in zip(self._parity, values):
            store.append(value.detach().double().cpu())

    def on_train_end(self, trainer: "Trainer", summary: dict[str, Any]) -> None:
        if not trainer.is_main:
            return
        from ..evaluation.plots import learning_curves, parity_plots

        plots = trainer.run.plots
        plots.mkdir(parents=True, exist_ok=True)
        try:
            if self._parity and self._parity[0]:
                e, e_ref, n, f, f_ref = (torch.cat(x).numpy() for x in self._parity)
                parity_plots(e, e_ref, n, f, f_ref, plots / "parity_val.png", title=f"validation, step {trainer.state.step}")
            logs = trainer.run.logs
            learning_curves(read_log(logs / "train.csv"), read_log(logs / "val.csv"), plots / "learning_curves.png")
        except Exception as err:  # noqa: BLE001 - a missing plot must not fail a finished run
            warnings.warn(f"plots not written ({type(err).__name__}: {err})", stacklevel=2)
        self._parity = None


def default_callbacks(config: "TrainConfig") -> list[Callback]:
    """The callbacks every run has, in order: signals, time budget, logs, progress bar,
    checkpoints, plots (as ``config.run`` and ``config.optim`` ask)."""
    run, optim = config.run, config.optim
    callbacks: list[Callback] = [StopOnSignal()]
    if run.time_budget_minutes is not None:
        callbacks.append(TimeBudget(run.time_budget_minutes))
    callbacks.append(MetricsLogger(run.log_every))
    if run.progress:
        callbacks.append(ProgressBar())
    callbacks.append(Checkpointing(optim.checkpoint_every))
    if run.plots:
        callbacks.append(Plots())
    return callbacks

"""The training loop: data, model, optimiser, EMA, validation, checkpoints, logs.

A run directory holds::

    config.yaml                 the configuration as parsed
    checkpoints/last.pt         latest state (resume from here)
    checkpoints/best.pt         best validation force MAE so far (EMA weights)
    logs/train.csv, val.csv     metrics; logs/tensorboard/ for TensorBoard
    plots/parity_val.png, learning_curves.png
    summary.json                final metrics and timings
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader, Dataset

from .. import __version__
from ..data.batch import AtomicBatch
from ..evaluation.metrics import S2EFMetrics
from ..models.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from ..models.scn import SCN
from .config import ConfigError, DataSource, TrainConfig
from .distributed import DistributedContext, ShardedSampler, all_reduce_sum, broadcast_object, init_distributed
from .ema import ExponentialMovingAverage
from .logs import RunLogger
from .losses import LossTerms, energy_force_loss, force_atoms_mask
from .schedule import learning_rate

__all__ = ["Trainer", "TrainingDiverged", "open_training_data", "collate"]

# A force scale below this (eV/A) means the data has no forces to speak of: use 1.
_MIN_FORCE_SCALE = 1e-6


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN or infinite."""


class _Indexed(Dataset):
    """Items are ``(index, atoms)`` so that a batch knows which structures it holds."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]


class _Collate:
    """Picklable collate function (DataLoader workers): ``[(i, atoms)]`` -> ``(indices, batch)``."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __call__(self, items: list[tuple[int, Any]]) -> tuple[list[int], AtomicBatch]:
        return [i for i, _ in items], AtomicBatch.from_atoms([a for _, a in items], dtype=self.dtype)


def collate(items: list[tuple[int, Any]], dtype: torch.dtype = torch.float32) -> tuple[list[int], AtomicBatch]:
    """``[(index, atoms)]`` -> ``(indices, AtomicBatch)``."""
    return _Collate(dtype)(items)


def open_training_data(source: DataSource, max_atomic_number: int) -> Dataset:
    """A data set with energy and force targets, validated as it is read."""
    from ..data.datasets import open_dataset

    return open_dataset(
        source.path,
        format=source.format,
        energy_key=source.energy_key,
        forces_key=source.forces_key,
        require_energy=True,
        require_forces=True,
        max_atomic_number=max_atomic_number,
    )


class Trainer:
    """Trains an SCN as ``config`` says (see :class:`~.config.TrainConfig`).

    Args:
        config: the parsed configuration.
        resume: continue the run in ``config.run.output_dir`` from ``checkpoints/last.pt``
            (optimiser, EMA, step, data order and random state restored, so the result equals
            an uninterrupted run).
        ctx: the distributed context (default: from ``torchrun``'s environment).
    """

    def __init__(self, config: TrainConfig, resume: bool = False, ctx: DistributedContext | None = None) -> None:
        self.config = config
        self.ctx = ctx or init_distributed(config.run.device)
        self.device = self.ctx.device
        self.dtype = {"float32": torch.float32, "float64": torch.float64}.get(config.run.dtype)
        if self.dtype is None:
            raise ConfigError(f"run.dtype must be float32 or float64, got {config.run.dtype!r}")
        optim = config.optim
        if optim.amp == "fp16" and self.device.type != "cuda":
            raise ConfigError("optim.amp: fp16 needs a GPU; use bf16 on a CPU")
        self.out = Path(config.run.output_dir)
        self.checkpoints = self.out / "checkpoints"
        last = self.checkpoints / "last.pt"
        if resume and not last.exists():
            raise FileNotFoundError(f"--resume: no checkpoint to resume from at {last}")
        if not resume and last.exists():
            raise FileExistsError(
                f"{self.out} already holds a run ({last}); continue it with --resume or choose another run.output_dir"
            )
        state = load_checkpoint(last) if resume else None

        torch.manual_seed(config.run.seed)  # identical initial weights on every rank
        self.model = SCN(**config.model).to(device=self.device, dtype=self.dtype)
        max_z = self.model.max_num_elements - 1
        self.train_data = open_training_data(config.train, max_z)
        self.val_data = open_training_data(config.val, max_z) if config.val else None
        self.statistics = self._statistics(state)
        self._apply_statistics()

        params = [p for p in self.model.parameters() if p.requires_grad]
        extra = {k: v for k, v in optim.optimizer_params.items() if k != "weight_decay"}
        self.optimizer = torch.optim.AdamW(params, lr=optim.lr_initial, weight_decay=optim.weight_decay, **extra)
        self.ema = ExponentialMovingAverage(self.model, optim.ema_decay) if optim.ema_decay else None
        self.scaler = torch.amp.GradScaler("cuda") if optim.amp == "fp16" else None
        self.network: torch.nn.Module = self.model
        if self.ctx.distributed:
            self.network = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )

        self.sampler = ShardedSampler(len(self.train_data), self.ctx.rank, self.ctx.world_size, seed=config.run.seed)
        self.steps_per_epoch = math.ceil(self.sampler.per_rank / optim.batch_size)
        self.total_steps = optim.max_steps or optim.max_epochs * self.steps_per_epoch
        if optim.max_epochs is not None:
            self.total_steps = min(self.total_steps, optim.max_epochs * self.steps_per_epoch)
        self.step = self.epoch = self.batch_in_epoch = 0
        self.best = {"force_mae": math.inf, "step": -1}
        self.logger = RunLogger(self.out / "logs", tensorboard=self.ctx.is_main) if self.ctx.is_main else None
        self._stop_requested = False
        self._running: list[tuple[float, ...]] = []  # per-step values since the last log line
        self._postfix: dict[str, float] = {}
        self._run_start, self._run_start_step, self._budget_clock = 0.0, 0, 0.0  # set by train()
        if state is not None:
            self._restore(state)
        elif self.ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        if state is None:  # training randomness (edge rolls) differs between ranks
            torch.manual_seed(config.run.seed + 1 + self.ctx.rank)

    def close(self) -> None:
        """Release the process group (multi-process runs). The DistributedDataParallel wrapper is
        dropped first so that no reducer outlives the group it talks to."""
        if self.network is not self.model:
            self.network = self.model
            gc.collect()
        self.ctx.close()

    # ------------------------------------------------------------------ statistics
    def _statistics(self, state: dict | None) -> "DatasetStatistics":  # noqa: F821
        from ..data.statistics import DatasetStatistics, compute_statistics

        if state is not None:
            return DatasetStatistics.from_dict(state["statistics"])
        statistics = None
        if self.ctx.is_main:  # read the data once, not once per process
            statistics = compute_statistics(
                self.train_data,
                max_structures=self.config.run.statistics_max_structures,
                progress=self.config.run.progress,
            )
        return broadcast_object(statistics, self.ctx)

    def _apply_statistics(self) -> None:
        """Per-element reference energies and one force scale for energy and forces (so
        ``-dE/dx`` of a conservative model stays the force), folded into the model."""
        scale = self.statistics.force_rms if self.statistics.force_rms > _MIN_FORCE_SCALE else 1.0
        self.force_scale = scale
        with torch.no_grad():
            self.model.energy_scale.fill_(scale)
            self.model.force_scale.fill_(scale)
            self.model.energy_shift.zero_()
            self.model.element_energies.zero_()
            for z, energy in self.statistics.element_energies.items():
                self.model.element_energies[int(z)] = energy

    # ------------------------------------------------------------------ one step
    def _autocast(self) -> contextlib.AbstractContextManager:
        amp = self.config.optim.amp
        if amp == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def forward_backward(self, batch: AtomicBatch) -> LossTerms:
        """Loss of ``batch`` on this rank and its gradient (accumulated into ``.grad``),
        normalised over the global batch (see :mod:`.losses`)."""
        optim = self.config.optim
        mask = force_atoms_mask(batch, optim.train_on_free_atoms)
        counts = all_reduce_sum(torch.tensor([batch.num_structures, int(mask.sum())], device=self.device), self.ctx)
        self.network.train()
        with self._autocast():
            prediction = self.network(batch)
        prediction = {k: v.to(self.dtype) for k, v in prediction.items()}
        terms = energy_force_loss(
            prediction,
            batch,
            self.force_scale,
            optim.energy_coefficient,
            optim.force_coefficient,
            free_only=optim.train_on_free_atoms,
            global_structures=int(counts[0]),
            global_force_atoms=int(counts[1]),
            world_size=self.ctx.world_size,
            per_atom_energy=optim.per_atom_energy_loss,
        )
        finite = all_reduce_sum(torch.isfinite(terms.loss.detach()).float().reshape(1), self.ctx)
        if int(finite) != self.ctx.world_size:
            raise TrainingDiverged("non-finite loss")
        if self.scaler is not None:
            self.scaler.scale(terms.loss).backward()
        else:
            terms.loss.backward()
        return terms

    def _optimizer_step(self) -> float:
        optim = self.config.optim
        lr = learning_rate(self.step, optim, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), optim.clip_grad_norm or math.inf)
        if not torch.isfinite(norm):
            raise TrainingDiverged(f"non-finite gradient norm ({float(norm)})")
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        return lr

    # ------------------------------------------------------------------ loop
    def _train_loader(self) -> DataLoader:
        optim = self.config.optim
        return DataLoader(
            _Indexed(self.train_data),
            batch_size=optim.batch_size,
            sampler=self.sampler,
            num_workers=optim.num_workers,
            collate_fn=_Collate(self.dtype),
            persistent_workers=False,
            # A loader's iterator draws a seed from its generator; a private one keeps the
            # global RNG (edge rolls) independent of how many loaders a run creates.
            generator=torch.Generator().manual_seed(self.config.run.seed),
        )

    def train(self) -> dict[str, Any]:
        """Run to ``max_epochs`` / ``max_steps``; returns the final summary."""
        optim = self.config.optim
        start = self._run_start = time.perf_counter()
        self._run_start_step = self.step
        with self._graceful_stop():
            while self.step < self.total_steps and not self._stop_requested:
                self.sampler.set_epoch(self.epoch, start=self.batch_in_epoch * optim.batch_size)
                fetch_start = time.perf_counter()
                for indices, batch in self._progress(self._train_loader()):
                    self._train_step(indices, batch, data_seconds=time.perf_counter() - fetch_start)
                    if self._stop_requested or self.step >= self.total_steps:
                        break
                    if optim.eval_every and self.step % optim.eval_every == 0:
                        self._evaluate_and_save()
                    elif optim.checkpoint_every and self.step % optim.checkpoint_every == 0:
                        self.save("last.pt")
                    fetch_start = time.perf_counter()
                else:
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                    if not optim.eval_every:
                        self._evaluate_and_save()
        if self._stop_requested:
            self.save("last.pt")
            if self.ctx.is_main:
                print(f"stopped at step {self.step}; continue with: scn train CONFIG --resume")
            return {"stopped_at_step": self.step}
        summary = self._finish(time.perf_counter() - start)
        return summary

    def _train_step(self, indices: list[int], batch: AtomicBatch, data_seconds: float = 0.0) -> None:
        batch = batch.to(self.device)
        t0 = time.perf_counter()
        try:
            terms = self.forward_backward(batch)
            lr = self._optimizer_step()
        except TrainingDiverged as err:
            last = self.checkpoints / "last.pt"
            kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
            raise TrainingDiverged(
                f"{err} at step {self.step} (epoch {self.epoch}, batch {self.batch_in_epoch}: structures "
                f"{indices} of {self.config.train.path}); training stopped, {kept}"
            ) from None
        self.step += 1
        self.batch_in_epoch += 1
        self._apply_time_budget()
        self._running.append((float(terms.loss.detach()), float(terms.energy_mae), float(terms.force_l2mae),
                              batch.num_structures, time.perf_counter() - t0, data_seconds))
        if self.step % self.config.run.log_every == 0 or self.step == self.total_steps:
            self._log_train(lr)

    # Steps timed before a time budget caps the run (the first ones include start-up costs).
    _BUDGET_CALIBRATION_STEPS = 20

    def _apply_time_budget(self) -> None:
        budget = self.config.run.time_budget_minutes
        done = self.step - self._run_start_step
        if budget is None or done not in (2, 2 + self._BUDGET_CALIBRATION_STEPS):
            return
        if done == 2:
            self._budget_clock = time.perf_counter()
            return
        per_step = (time.perf_counter() - self._budget_clock) / self._BUDGET_CALIBRATION_STEPS
        # validation passes cost about as much as a tenth of the training (set aside)
        remaining = 0.9 * budget * 60.0 - (time.perf_counter() - self._run_start)
        steps = self.step + int(max(0.0, remaining) / per_step)
        steps = int(all_reduce_sum(torch.tensor([steps], dtype=torch.float64), self.ctx).item() / self.ctx.world_size)
        if steps < self.total_steps:
            self.total_steps = steps
            if self.ctx.is_main:
                print(f"time budget: {per_step:.3f} s per step, training for {steps} steps")

    def _log_train(self, lr: float) -> None:
        rows, self._running = self._running, []
        if not rows:
            return
        sums = all_reduce_sum(torch.tensor(rows, dtype=torch.float64).sum(0), self.ctx)
        n = len(rows) * self.ctx.world_size
        step_seconds, data_seconds = float(sums[4]) / n, float(sums[5]) / n
        values = {
            "loss": float(sums[0]) / n,
            "energy_mae": float(sums[1]) / n,
            "force_l2mae": float(sums[2]) / n,
            "lr": lr,
            "epoch": self.epoch,
            # throughput of the whole loop (data included); the share of it spent waiting for data
            "structures_per_s": float(sums[3]) / max((step_seconds + data_seconds) * n / self.ctx.world_size, 1e-9),
            "step_seconds": step_seconds,
            "data_seconds": data_seconds,
            "data_share": data_seconds / max(step_seconds + data_seconds, 1e-12),
        }
        self._postfix = values
        if self.logger is not None:
            self.logger.log("train", self.step, values)

    def _progress(self, loader: DataLoader) -> Iterator:
        if not (self.config.run.progress and self.ctx.is_main):
            yield from loader
            return
        from tqdm import tqdm

        bar = tqdm(loader, total=len(loader), desc=f"epoch {self.epoch}", unit="batch", leave=False)
        for item in bar:
            yield item
            values = self._postfix
            if values:
                bar.set_postfix(loss=f"{values['loss']:.3g}", lr=f"{values['lr']:.2g}",
                                st_s=f"{values['structures_per_s']:.1f}", refresh=False)

    @contextlib.contextmanager
    def _graceful_stop(self) -> Iterator[None]:
        """First Ctrl-C / SIGTERM: finish the current step, save, stop. Second: stop now."""

        def handler(signum, frame):  # noqa: ANN001
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True
            if self.ctx.is_main:
                print("\nstopping after this step (again to abort without saving)...")

        try:
            previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread: no signal handling
            previous = {}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def validate(self, data: Dataset | None = None, parity: bool = False) -> dict[str, float]:
        """S2EF metrics of the EMA weights (or the raw ones without EMA) on ``data``
        (default: the validation set), each rank evaluating its share. With ``parity``, this
        rank's predictions and targets are also kept (on the CPU) for the parity plots."""
        data = data if data is not None else self.val_data
        if data is None:
            return {}
        indices = list(range(self.ctx.rank, len(data), self.ctx.world_size))
        loader = DataLoader(
            _Indexed(data),
            batch_size=self.config.optim.eval_batch_size or self.config.optim.batch_size,
            sampler=indices,
            num_workers=self.config.optim.num_workers,
            collate_fn=_Collate(self.dtype),
            generator=torch.Generator(),
        )
        metrics = S2EFMetrics()
        if parity:
            self._parity = ([], [], [], [], [])
        context = self.ema.applied_to(self.model) if self.ema is not None else contextlib.nullcontext(self.model)
        with context as model:
            model.eval()
            for _, batch in loader:
                batch = batch.to(self.device)
                prediction = model(batch)
                metrics.update(prediction, batch, free_only=True)
                if parity:
                    self._collect_parity(prediction, batch)
        metrics.sums = all_reduce_sum(metrics.sums.to(self.device), self.ctx).cpu()
        return metrics.compute()

    def _collect_parity(self, prediction: dict[str, torch.Tensor], batch: AtomicBatch) -> None:
        free = ~batch.fixed
        for store, value in zip(
            self._parity,
            (prediction["energy"], batch.energy, batch.natoms, prediction["forces"][free], batch.forces[free]),
        ):
            store.append(value.detach().double().cpu())

    def _evaluate_and_save(self, parity: bool = False) -> dict[str, float]:
        """Validate, log, save ``last.pt`` (and ``best.pt`` when validation force MAE improved)."""
        metrics = self.validate(parity=parity)
        if metrics and self.logger is not None:
            self.logger.log("val", self.step, {**metrics, "epoch": self.epoch})
        improved = bool(metrics) and metrics["force_mae"] < self.best["force_mae"]
        if improved:
            self.best = {"force_mae": metrics["force_mae"], "step": self.step}
        self.save("last.pt", metrics)
        if improved:
            self.save("best.pt", metrics, trainer_state=False)
        return metrics

    def _finish(self, seconds: float) -> dict[str, Any]:
        metrics = self._evaluate_and_save(parity=self.ctx.is_main and self.config.run.plots)
        if not (self.checkpoints / "best.pt").exists():
            self.save("best.pt", metrics, trainer_state=False)
        summary = {
            "steps": self.step,
            "epochs": self.epoch,
            "seconds": seconds,
            "final_val": metrics,
            "best": self.best,
            "statistics": self.statistics.to_dict(),
        }
        if self.ctx.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
            if self.config.run.plots:
                self._plots()
            self.logger.close()
        return summary

    def _plots(self) -> None:
        from ..evaluation.plots import learning_curves, parity_plots

        plots = self.out / "plots"
        plots.mkdir(exist_ok=True)
        if getattr(self, "_parity", None) and self._parity[0]:
            e, e_ref, n, f, f_ref = (torch.cat(x).numpy() for x in self._parity)
            parity_plots(e, e_ref, n, f, f_ref, plots / "parity_val.png", title=f"validation, step {self.step}")
        learning_curves(self.logger.read("train"), self.logger.read("val"), plots / "learning_curves.png")

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, metrics: dict | None = None, trainer_state: bool = True) -> dict[str, Any]:
        """The run's state as a checkpoint dictionary (see :mod:`..models.checkpoint`)."""
        checkpoint = {
            "format": CHECKPOINT_FORMAT,
            "package_version": __version__,
            "model_config": dict(self.model.config),
            "state_dict": self.model.state_dict(),
            "ema_state_dict": self.ema.shadow if self.ema is not None else None,
            "statistics": self.statistics.to_dict(),
            "config": self.config.to_dict(),
            "metrics": metrics or {},
        }
        if trainer_state:
            checkpoint["trainer_state"] = {
                "optimizer": self.optimizer.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "step": self.step,
                "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch,
                "best": self.best,
                "world_size": self.ctx.world_size,
                "rng": self._gather_rng(),
            }
        return checkpoint

    def save(self, name: str, metrics: dict | None = None, trainer_state: bool = True) -> Path | None:
        """Write ``checkpoints/<name>`` atomically (main rank only)."""
        checkpoint = self.checkpoint(metrics, trainer_state)
        if not self.ctx.is_main:
            return None
        return save_checkpoint(checkpoint, self.checkpoints / name)

    def _gather_rng(self) -> list[dict[str, Any]]:
        state = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        if not self.ctx.distributed:
            return [state]
        gathered: list = [None] * self.ctx.world_size
        torch.distributed.all_gather_object(gathered, state)
        return gathered

    def _restore(self, checkpoint: dict[str, Any]) -> None:
        trainer = checkpoint.get("trainer_state")
        if trainer is None:
            raise ValueError("the checkpoint has no trainer state (an exported model): cannot resume from it")
        if dict(checkpoint["model_config"]) != dict(self.model.config):
            raise ConfigError("--resume: the configuration's model differs from the checkpoint's")
        if trainer["world_size"] != self.ctx.world_size:
            raise ConfigError(
                f"--resume: the run used {trainer['world_size']} processes, this one {self.ctx.world_size}; "
                "the data order would differ"
            )
        self.model.load_state_dict(checkpoint["state_dict"])
        self.optimizer.load_state_dict(trainer["optimizer"])
        if self.ema is not None and trainer["ema"] is not None:
            self.ema.load_state_dict(trainer["ema"])
        if self.scaler is not None and trainer["scaler"] is not None:
            self.scaler.load_state_dict(trainer["scaler"])
        self.step, self.epoch, self.batch_in_epoch = trainer["step"], trainer["epoch"], trainer["batch_in_epoch"]
        self.best = trainer["best"]
        rng = trainer["rng"][self.ctx.rank]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)

"""The trainer: builds a run (directory, data, model, optimiser, EMA) and runs the loop.

The parts: :class:`~.run.RunDirectory` (layout and rules of the run directory),
:class:`~.state.TrainState` (counters and random state), :mod:`.data` (batches and their
neighbour graphs, built in the DataLoader workers) and :mod:`.callbacks` (logging,
checkpoints, time budget, signals, plots). :meth:`Trainer.train` is the loop: it steps the
model and calls the callbacks' hooks.
"""

from __future__ import annotations

import contextlib
import gc
import math
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .. import __version__
from ..data.batch import AtomicBatch
from ..data.formats.common import DataError
from ..data.neighbors import Graph
from ..data.validation import StructureError
from ..evaluation.metrics import S2EFMetrics
from ..models.checkpoint import model_checkpoint, read_checkpoint, save_checkpoint
from ..models.registry import model_spec
from .callbacks import Callback, CallbackList, StepResult, StopRequest, default_callbacks
from .config import ConfigError, TrainConfig
from .data import GraphCollate, IndexedDataset, TrainingBatch, collate, locate_in_data_set, open_training_data
from .distributed import (
    DistributedContext,
    ShardedSampler,
    all_gather_object,
    all_reduce_max,
    all_reduce_sum,
    broadcast_object,
    init_distributed,
)
from .ema import ExponentialMovingAverage
from .errors import TrainingDiverged, TrainingInterrupted
from .losses import LossTerms, energy_force_loss, force_atoms_mask
from .run import RunDirectory, RunDirectoryError
from .schedule import learning_rate
from .state import TrainState

#: Options a newly trained SCN gets unless its configuration says otherwise (official
#: checkpoints keep SCNConfig's defaults): the ZBL repulsion prior, which only acts at distances
#: training data does not reach (well below bond lengths) and keeps atoms from collapsing there.
#: Each model's own are its registry entry's ``new_model_defaults`` (SchNet has none).
NEW_MODEL_DEFAULTS = dict(model_spec("scn").new_model_defaults)

__all__ = ["NEW_MODEL_DEFAULTS", "Trainer", "TrainingDiverged", "TrainingInterrupted", "collate", "open_training_data"]

# A force scale below this (eV/A) means the data has no forces to speak of: use 1.
_MIN_FORCE_SCALE = 1e-6
# fp16: steps the loss scaler may skip in a row (overflowing gradients) before the run is
# declared diverged; each skip halves the scale, so this is a factor 2^-50 below the start.
_MAX_SKIPPED_STEPS = 50
# At most this many structures / weights are named in a divergence message.
_MAX_NAMED = 8


class Trainer:
    """Trains a model as ``config`` says (see :class:`~.config.TrainConfig`): whichever the
    registry names ``config.model_name`` (an SCN, a SchNet, ...), with the same data, loss,
    metrics and checkpoints.

    Args:
        config: the parsed configuration.
        resume: continue the run in ``config.run.output_dir`` from ``checkpoints/last.pt``
            (optimiser, EMA, step, data order and random state restored, so the result equals
            an uninterrupted run).
        ctx: the distributed context (default: from ``torchrun``'s environment).
        callbacks: added after the default ones (:func:`~.callbacks.default_callbacks`).
        overwrite: start afresh in a directory that holds an earlier run (what that run wrote
            is removed once this one has opened its data and built its model).

    Raises:
        RunDirectoryError: the directory cannot be used as asked (see :class:`~.run.RunDirectory`).
        ConfigError, DataError, CheckpointError: a bad configuration, data set or checkpoint.
    """

    def __init__(
        self,
        config: TrainConfig,
        resume: bool = False,
        ctx: DistributedContext | None = None,
        callbacks: Iterable[Callback] | None = None,
        overwrite: bool = False,
        trust_pickle: bool = False,
    ) -> None:
        self.config = config
        self.trust_pickle = trust_pickle
        self.dtype = {"float32": torch.float32, "float64": torch.float64}.get(config.run.dtype)
        if self.dtype is None:
            raise ConfigError(f"run.dtype must be float32 or float64, got {config.run.dtype!r}")
        self.ctx = ctx or init_distributed(config.run.device)
        self.device = self.ctx.device
        if config.optim.amp == "fp16" and self.device.type != "cuda":
            raise ConfigError("optim.amp: fp16 needs a GPU; use bf16 on a CPU")
        self.run = RunDirectory(config.run.output_dir)
        self._on_main(lambda: self.run.open(resume=resume, overwrite=overwrite))
        try:
            self._build(resume, overwrite)
        except BaseException:
            self.run.release()
            raise
        self.callbacks = CallbackList([*default_callbacks(config), *(callbacks or [])])
        self.stop_request: StopRequest | None = None
        self._skipped_in_a_row = 0

    def _on_main(self, action: Callable[[], None]) -> None:
        """Run ``action`` on the main process; a RunDirectoryError there is raised on every
        process (so that the others do not wait for a run that will not start)."""
        message = None
        if self.ctx.is_main:
            try:
                action()
            except (RunDirectoryError, OSError) as err:
                if not isinstance(err, RunDirectoryError):  # e.g. no permission to create it
                    err = RunDirectoryError(f"run.output_dir {self.run.path}: {err}")
                if not self.ctx.distributed:
                    raise err from None
                message = str(err)
        message = broadcast_object(message, self.ctx)
        if message is not None:
            raise RunDirectoryError(message)

    def _build(self, resume: bool, overwrite: bool) -> None:
        config, optim = self.config, self.config.optim
        checkpoint = read_checkpoint(self.run.last_checkpoint) if resume else None
        torch.manual_seed(config.run.seed)  # identical initial weights on every rank
        self.model_spec = model_spec(config.model_name)
        defaults = dict(self.model_spec.new_model_defaults)
        if checkpoint is not None:  # a run begun before a default existed goes on without it
            stored = checkpoint.get("model_config", {})
            defaults = {k: v for k, v in defaults.items() if k in stored}
        self.model = self.model_spec.build({**defaults, **config.model}).to(device=self.device, dtype=self.dtype)
        model_config = self.model.config
        max_z = model_config.max_num_elements - 1
        self.train_data = open_training_data(config.train, max_z, trust_pickle=self.trust_pickle)
        self.val_data = (open_training_data(config.val, max_z, trust_pickle=self.trust_pickle)
                         if config.val else None)
        self.statistics = self._statistics(checkpoint)
        self._apply_statistics()
        if config.run.compile:
            self._compile_blocks(config.run.compile)
        self.collate = GraphCollate(
            self.dtype, model_config.cutoff, model_config.neighbor_cap, config.train.path,
            ties=model_config.neighbor_ties,
        )

        params = [p for p in self.model.parameters() if p.requires_grad]
        extra = {k: v for k, v in optim.optimizer_params.items() if k != "weight_decay"}
        self.optimizer = torch.optim.AdamW(params, lr=optim.lr_initial, weight_decay=optim.weight_decay, **extra)
        self.ema = ExponentialMovingAverage(self.model, optim.ema_decay) if optim.ema_decay else None
        self.scaler = torch.amp.GradScaler(self.device.type) if optim.amp == "fp16" else None
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
        self.state = TrainState()
        self.resumed_from: int | None = None
        if checkpoint is not None:
            self._restore(checkpoint)
            self.resumed_from = self.state.step
        else:  # training randomness (edge rolls) differs between ranks
            torch.manual_seed(config.run.seed + 1 + self.ctx.rank)
        if self.ctx.is_main:
            self._prepare_directory(resume, overwrite)

    def _prepare_directory(self, resume: bool, overwrite: bool) -> None:
        if overwrite:
            removed = self.run.clear()
            if removed:
                self.note(f"--overwrite: removed the earlier run's {', '.join(removed)} from {self.run.path}")
        stale = self.run.remove_stale_temporaries()
        if stale:
            self.note(f"removed {len(stale)} partial checkpoint file(s) left by a run killed while saving: "
                      f"{', '.join(p.name for p in stale)}")
        changed = self.run.write_config(self.config.to_dict())
        if resume and changed:
            self.note(f"resume: configuration changed since the run started ({', '.join(changed[:8])}); "
                      f"{self.run.config_file} updated")

    def note(self, message: str) -> None:
        """Print ``message`` on the main process."""
        if self.ctx.is_main:
            print(message, flush=True)

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    def close(self) -> None:
        """Release the run directory and the process group (multi-process runs). The
        DistributedDataParallel wrapper is dropped first so that no reducer outlives the group
        it talks to."""
        self.run.release()
        if self.network is not self.model:
            self.network = self.model
            gc.collect()
        self.ctx.close()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ statistics
    def _statistics(self, checkpoint: dict | None) -> "DatasetStatistics":  # noqa: F821
        from ..data.statistics import DatasetStatistics, compute_statistics

        if checkpoint is not None:
            return DatasetStatistics.from_dict(checkpoint["statistics"])
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
        statistics = self.statistics
        scale = statistics.force_rms if statistics.force_rms and statistics.force_rms > _MIN_FORCE_SCALE else 1.0
        values = {"force scale": scale, **{f"element energy of Z={z}": e for z, e in statistics.element_energies.items()}}
        bad = [f"{k} {v:.4g}" for k, v in values.items() if not torch.isfinite(torch.tensor(float(v), dtype=self.dtype))]
        if bad:
            raise DataError(
                f"{self.config.train.path}: the training targets' statistics are not finite in {self.config.run.dtype} "
                f"({', '.join(bad[:4])}): some energies or forces are implausible; find them with "
                f"'scn data check {self.config.train.path}'"
            )
        self.force_scale = scale
        self.model.set_normalization(
            energy_scale=scale, energy_shift=0.0, force_scale=scale, element_energies=statistics.element_energies
        )

    # ------------------------------------------------------------------ data
    def loader(self, data: Dataset, sampler: Sampler | Sequence[int], batch_size: int) -> DataLoader:
        """Batches of ``data`` (:class:`~.data.TrainingBatch`, graphs built in the workers)."""
        collate_fn = GraphCollate(self.dtype, self.collate.cutoff, self.collate.max_num_neighbors,
                                  str(getattr(data, "path", "")) or None, ties=self.collate.ties)
        return DataLoader(
            IndexedDataset(data),
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.config.optim.num_workers,
            collate_fn=collate_fn,
            persistent_workers=False,
            # A loader's iterator draws a seed from its generator; a private one keeps the
            # global RNG (edge rolls) independent of how many loaders a run creates.
            generator=torch.Generator().manual_seed(self.config.run.seed),
        )

    # ------------------------------------------------------------------ the loop
    def request_stop(self, reason: str, exit_code: int | None = None) -> None:
        """Stop after the current step: a normal end without ``exit_code`` (final validation,
        summary); with one, save ``last.pt`` and raise :class:`TrainingInterrupted`."""
        if self.stop_request is None or (exit_code is not None and self.stop_request.exit_code is None):
            self.stop_request = StopRequest(reason, exit_code)

    def validation_due(self) -> bool:
        """Whether the loop validates (and so saves ``last.pt``) after the step just taken."""
        step, every = self.state.step, self.config.optim.eval_every
        if step >= self.total_steps:
            return True
        if every:
            return step % every == 0
        return self.state.batch_in_epoch >= self.steps_per_epoch

    def train(self) -> dict[str, Any]:
        """Run to ``max_epochs`` / ``max_steps`` (or a stop request); returns the summary
        (``summary.json``).

        Raises:
            TrainingInterrupted: stopped by a signal (``last.pt`` saved first).
            TrainingDiverged: non-finite loss or gradients (``last.pt`` is the last good state).
            DataError: a structure that cannot be used.
        """
        optim = self.config.optim
        callbacks = self.callbacks
        self.stop_request = None
        start = time.perf_counter()
        try:
            callbacks.call("on_train_start", self)
            while self.state.step < self.total_steps and self.stop_request is None:
                self.sampler.set_epoch(self.state.epoch, start=self.state.batch_in_epoch * optim.batch_size)
                callbacks.call("on_epoch_start", self)
                if not self._run_epoch():
                    break
                self.state.end_epoch()
                callbacks.call("on_epoch_end", self)
                if not optim.eval_every:
                    self._validate(final=False)
                self._agree_on_stop()  # a signal may have come during the validation
            request = self.stop_request
            if request is not None and request.exit_code is not None:
                callbacks.call("on_stop", self, request)
                raise TrainingInterrupted(
                    f"{request.reason}: stopped at step {self.state.step}, saved in {self.run.last_checkpoint}; "
                    "continue with: scn train CONFIG --resume",
                    exit_code=request.exit_code,
                    step=self.state.step,
                    saved=True,
                )
            summary = self._finish(time.perf_counter() - start)
            callbacks.call("on_train_end", self, summary)
            return summary
        except BaseException as err:
            callbacks.call("on_exception", self, err)
            raise
        finally:
            self.run.release()

    def _run_epoch(self) -> bool:
        """This epoch's remaining steps; False if the run stopped or ended before its end."""
        every = self.config.optim.eval_every
        batches = iter(self.loader(self.train_data, self.sampler, self.config.optim.batch_size))
        while True:
            fetch = time.perf_counter()
            item = next(batches, None)
            if item is None:
                return True
            result = self.train_step(item, data_seconds=time.perf_counter() - fetch)
            self.callbacks.call("on_step_end", self, result)
            self._agree_on_stop()
            if self.stop_request is not None or self.state.step >= self.total_steps:
                return False
            if every and self.state.step % every == 0:
                self._validate(final=False)

    def _agree_on_stop(self) -> None:
        """A stop requested on one process stops all of them after the same step."""
        if not self.ctx.distributed:
            return
        request = self.stop_request
        local = torch.tensor([request is not None, (request.exit_code or 0) if request else 0], dtype=torch.long)
        agreed = all_reduce_max(local, self.ctx).tolist()
        if agreed[0] and request is None:
            code = agreed[1] or None
            try:
                reason = f"{signal.Signals(code - 128).name} received by another process" if code else ""
            except ValueError:
                reason = ""
            self.stop_request = StopRequest(reason or "stop requested by another process", code)
        elif agreed[1] and request is not None and request.exit_code != agreed[1]:
            self.stop_request = StopRequest(request.reason, agreed[1])

    def train_step(self, item: TrainingBatch, data_seconds: float = 0.0) -> StepResult:
        """One optimiser step on ``item`` (this process's share of a global batch)."""
        self._raise_batch_error(item)
        item = item.to(self.device)
        self.callbacks.call("on_batch_start", self, item)
        t0 = time.perf_counter()
        state = self.state
        try:
            terms = self.forward_backward(item.batch, item.graph, indices=item.indices)
            lr, skipped = self.optimizer_step(item.indices)
        except TrainingDiverged as err:
            raise TrainingDiverged(
                err.reason, err.detail, where=f"at step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch})",
                kept=self.kept_checkpoint(),
            ) from None
        except DataError as err:
            raise DataError(f"{err} (training stopped at step {state.step}; {self.kept_checkpoint()})") from None
        state.advance()
        return StepResult(
            step=state.step,
            indices=list(item.indices),
            num_structures=item.batch.num_structures,
            loss=float(terms.loss.detach()),
            energy_mae=float(terms.energy_mae),
            force_l2mae=float(terms.force_l2mae),
            lr=lr,
            step_seconds=time.perf_counter() - t0,
            data_seconds=data_seconds,
            skipped=skipped,
        )

    def _raise_batch_error(self, item: TrainingBatch) -> None:
        error = item.error
        if self.ctx.distributed:  # every process stops, with the message of the one that failed
            if int(all_reduce_max(torch.tensor([error is not None], dtype=torch.long), self.ctx)):
                error = next(e for e in all_gather_object(error, self.ctx) if e is not None)
        if error is not None:
            raise DataError(f"{error} (training stopped at step {self.state.step}; {self.kept_checkpoint()})")

    def kept_checkpoint(self) -> str:
        last = self.run.last_checkpoint
        return f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"

    def _compile_blocks(self, backend: str) -> None:
        """``torch.compile`` each interaction block in place (``run.compile``): parameter names,
        checkpoints and EMA stay those of the eager model."""
        if backend is True:  # `compile: true` in YAML
            backend = "inductor"
        if not isinstance(backend, str):
            raise ConfigError(f"run.compile: a torch.compile backend name (e.g. inductor) or null, got {backend!r}")
        blocks = getattr(self.model, "interactions", None)
        if not isinstance(blocks, torch.nn.ModuleList):
            raise ConfigError(f"run.compile: the {self.config.model_name} model has no interaction blocks to compile")
        if getattr(self.model, "conservative", False):
            raise ConfigError(
                "run.compile: energy-conserving models (forces -dE/dx) train through a double backward, "
                "which torch.compile does not support; use a direct-force model or run.compile: null"
            )
        for block in blocks:
            block.compile(backend=backend, dynamic=True)

    # ------------------------------------------------------------------ one step
    def _autocast(self) -> contextlib.AbstractContextManager:
        amp = self.config.optim.amp
        if amp == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def forward_backward(
        self, batch: AtomicBatch, graph: Graph | None = None, indices: Sequence[int] | None = None
    ) -> LossTerms:
        """Loss of ``batch`` on this rank and its gradient (accumulated into ``.grad``),
        normalised over the global batch (see :mod:`.losses`). ``indices`` (the structures'
        indices in the training set) name the culprits when the loss is not finite."""
        optim = self.config.optim
        mask = force_atoms_mask(batch, optim.train_on_free_atoms)
        counts = all_reduce_sum(torch.tensor([batch.num_structures, int(mask.sum())], device=self.device), self.ctx)
        self.network.train()
        failure = None
        try:
            with self._autocast():
                prediction = self.network(batch, graph=graph)
        except StructureError as err:  # the model's input checks name the batch position
            failure = locate_in_data_set(err, indices or range(batch.num_structures), self.config.train.path)
        if self.ctx.distributed:  # every process stops, with the message of the one that failed
            if int(all_reduce_max(torch.tensor([failure is not None], dtype=torch.long), self.ctx)):
                failure = next(f for f in all_gather_object(failure, self.ctx) if f is not None)
        if failure is not None:
            raise DataError(failure)
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
        finite = bool(torch.isfinite(terms.loss.detach()))
        if int(all_reduce_sum(torch.tensor([float(finite)]), self.ctx)) != self.ctx.world_size:
            culprit = None if finite else self._diagnose(prediction, batch, indices)
            found = [(r, d) for r, d in enumerate(all_gather_object(culprit, self.ctx)) if d is not None]
            detail = "; ".join(f"process {r}: {d}" if self.ctx.distributed else d for r, d in found)
            raise TrainingDiverged("non-finite loss", detail)
        if self.scaler is not None:
            self.scaler.scale(terms.loss).backward()
        else:
            terms.loss.backward()
        return terms

    def optimizer_step(self, indices: Sequence[int] | None = None) -> tuple[float, bool]:
        """Apply the accumulated gradients (learning rate of this step, clipping, EMA); returns
        the learning rate and whether the step was skipped (fp16 loss scaling: gradients that
        overflow are skipped and the scale lowered, as GradScaler is meant to be used)."""
        optim = self.config.optim
        lr = learning_rate(self.state.step, optim, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), optim.clip_grad_norm or math.inf)
        finite = bool(torch.isfinite(norm))
        if not finite and self.scaler is None:
            raise TrainingDiverged(f"non-finite gradient norm ({float(norm)})", self._batches(indices))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the update when the gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if not finite:
            self._skipped_in_a_row += 1
            if self._skipped_in_a_row >= _MAX_SKIPPED_STEPS:
                raise TrainingDiverged(
                    "non-finite gradients",
                    f"{self._skipped_in_a_row} steps in a row, down to loss scale {self.scaler.get_scale():.3g}; "
                    f"last batch: {self._batches(indices)}",
                )
            return lr, True
        self._skipped_in_a_row = 0
        if self.ema is not None:
            self.ema.update(self.model)
        return lr, False

    def _bad_weights(self) -> list[str]:
        return [k for k, v in self.model.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]

    def _batches(self, indices: Sequence[int] | None) -> str:
        """The global batch's structures (every process's), and non-finite weights if any."""
        gathered = all_gather_object(list(indices) if indices is not None else None, self.ctx)
        parts = [f"process {r}: " * self.ctx.distributed + f"structures {_named(i)}" for r, i in enumerate(gathered) if i]
        text = f"the batch held {'; '.join(parts)} of {self.config.train.path}" if parts else ""
        bad = self._bad_weights()
        if bad:
            text = f"non-finite model weights ({_named(bad)}); " + text
        return text

    def _diagnose(self, prediction: dict[str, torch.Tensor], batch: AtomicBatch, indices: Sequence[int] | None) -> str:
        """Which structures of this process's batch made the loss non-finite, by their index
        in the training set."""
        indices = list(indices) if indices is not None else list(range(batch.num_structures))
        prediction = {k: v.detach() for k, v in prediction.items()}
        where = self.config.train.path
        bad_weights = self._bad_weights()
        if bad_weights:  # every prediction is then non-finite: the model diverged, not the data
            return (f"the model's weights are not finite ({_named(bad_weights)}), so no prediction is; the batch "
                    f"held structures {_named(indices)} of {where}")

        def per_structure(bad_atoms: torch.Tensor) -> torch.Tensor:
            counts = torch.zeros(batch.num_structures, device=bad_atoms.device)
            return counts.index_add(0, batch.batch, bad_atoms.to(counts.dtype)) > 0

        checks = [("predicted energy", ~torch.isfinite(prediction["energy"]))]
        if "forces" in prediction:
            checks.append(("predicted forces", per_structure(~torch.isfinite(prediction["forces"]).all(dim=1))))
        if batch.energy is not None:
            checks.append(("target energy", ~torch.isfinite(batch.energy)))
        if batch.forces is not None:
            checks.append(("target forces", per_structure(~torch.isfinite(batch.forces).all(dim=1))))
        reasons: dict[int, list[str]] = {}
        for what, flags in checks:
            for s in torch.nonzero(flags).flatten().tolist():
                reasons.setdefault(s, []).append(what)
        if reasons:
            named = [f"{indices[s]} (non-finite {', '.join(r)})" for s, r in sorted(reasons.items())]
            more = f", ... ({len(named)} in all)" if len(named) > _MAX_NAMED else ""
            noun = "structure" if len(named) == 1 else "structures"
            return f"{noun} {', '.join(named[:_MAX_NAMED])}{more} of {where}"
        # Every value finite, the loss not: it overflowed. Name the largest contribution.
        optim = self.config.optim
        e_err = (prediction["energy"].double() - batch.energy.double()).abs()
        f_err = torch.linalg.vector_norm(prediction["forces"].double() - batch.forces.double(), dim=1)
        f_max = torch.zeros_like(e_err).scatter_reduce(0, batch.batch, f_err, reduce="amax")
        f_sum = torch.zeros_like(e_err).index_add(0, batch.batch, f_err)
        worst = int(torch.argmax(optim.energy_coefficient * e_err + optim.force_coefficient * f_sum))
        return (f"the loss overflowed {self.config.run.dtype}: structure {indices[worst]} of {where} contributes "
                f"most (energy error {float(e_err[worst]):.3g} eV, largest force error {float(f_max[worst]):.3g} eV/Å): "
                "implausible targets?")

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def validate(
        self,
        data: Dataset | None = None,
        on_batch: Callable[[TrainingBatch, dict[str, torch.Tensor]], None] | None = None,
    ) -> dict[str, float]:
        """S2EF metrics of the EMA weights (or the raw ones without EMA) on ``data``
        (default: the validation set), each rank evaluating its share; ``on_batch(batch,
        prediction)`` sees every batch."""
        data = data if data is not None else self.val_data
        if data is None:
            return {}
        optim = self.config.optim
        indices = list(range(self.ctx.rank, len(data), self.ctx.world_size))
        metrics = S2EFMetrics()
        context = self.ema.applied_to(self.model) if self.ema is not None else contextlib.nullcontext(self.model)
        with context as model:
            model.eval()
            for item in self.loader(data, indices, optim.eval_batch_size or optim.batch_size):
                if item.error is not None:
                    raise DataError(item.error)
                item = item.to(self.device)
                try:
                    prediction = model(item.batch, graph=item.graph)
                except StructureError as err:
                    raise DataError(locate_in_data_set(err, item.indices, str(getattr(data, "path", "")) or None)) from None
                metrics.update(prediction, item.batch, free_only=True)
                if on_batch is not None:
                    on_batch(item, prediction)
        metrics.sums = all_reduce_sum(metrics.sums.to(self.device), self.ctx).cpu()
        return metrics.compute()

    def _validate(self, final: bool) -> dict[str, float]:
        callbacks = self.callbacks
        callbacks.call("on_validation_start", self, final)
        metrics = self.validate(on_batch=lambda item, prediction: callbacks.call(
            "on_validation_batch", self, item, prediction, final))
        improved = bool(metrics) and self.state.record_validation(metrics["force_mae"])
        callbacks.call("on_validation_end", self, metrics, improved, final)
        return metrics

    def _finish(self, seconds: float) -> dict[str, Any]:
        metrics = self._validate(final=True)
        summary = {
            "steps": self.state.step,
            "epochs": self.state.epoch,
            "seconds": seconds,
            "final_val": metrics,
            "best": dict(self.state.best),
            "statistics": self.statistics.to_dict(),
        }
        if self.stop_request is not None:
            summary["stopped"] = self.stop_request.reason
        if self.ctx.is_main:
            self.run.write_summary(summary)
        return summary

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, metrics: dict | None = None, trainer_state: bool = True) -> dict[str, Any]:
        """The run's state as a checkpoint dictionary (see :mod:`..models.checkpoint`)."""
        checkpoint = model_checkpoint(
            self.model,
            ema_state_dict=self.ema.shadow if self.ema is not None else None,
            package_version=__version__,
            statistics=self.statistics.to_dict(),
            config=self.config.to_dict(),
            metrics=metrics or {},
        )
        if trainer_state:
            state = self.state.state_dict(self.device)
            state["rng"] = [r for rngs in all_gather_object(state["rng"], self.ctx) for r in rngs]
            checkpoint["trainer_state"] = {
                **state,
                "optimizer": self.optimizer.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "world_size": self.ctx.world_size,
            }
        return checkpoint

    def save(self, name: str, metrics: dict | None = None, trainer_state: bool = True) -> Path | None:
        """Write ``checkpoints/<name>`` atomically (main rank only; every rank must call it
        when ``trainer_state`` is saved, as the random states are gathered)."""
        checkpoint = self.checkpoint(metrics, trainer_state)
        if not self.ctx.is_main:
            return None
        return save_checkpoint(checkpoint, self.run.checkpoints / name)

    def _restore(self, checkpoint: dict[str, Any]) -> None:
        trainer = checkpoint.get("trainer_state")
        last = self.run.last_checkpoint
        if trainer is None:
            raise ConfigError(f"--resume: {last} has no trainer state (an exported model): cannot resume from it")
        stored_name = checkpoint.get("model_name", "scn")
        if stored_name != self.model_spec.name:
            raise ConfigError(f"--resume: the configuration's model is {self.model_spec.name!r}, the one in {last} {stored_name!r}")
        if self.model_spec.config_class.from_dict(checkpoint["model_config"]) != self.model.config:
            raise ConfigError(f"--resume: the configuration's model differs from the one in {last}")
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
        self.state.load_state_dict(trainer, rank=self.ctx.rank, device=self.device)


def _named(items: Sequence[Any]) -> str:
    items = list(items)
    text = ", ".join(str(i) for i in items[:_MAX_NAMED])
    return f"[{text}{f', ... ({len(items)} in all)' if len(items) > _MAX_NAMED else ''}]"

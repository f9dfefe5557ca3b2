"""Where a run is: step, epoch, position in the epoch, best validation, random state.

Together with the optimiser, the EMA and the loss scaler (which have their own ``state_dict``)
this is everything a checkpoint needs for a resumed run to equal an uninterrupted one: the
learning rate is a function of the step (:mod:`.schedule`), the data order a function of the seed
and the epoch (:class:`~.distributed.ShardedSampler`), and the random state (edge rolls) is
saved per process.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["TrainState", "capture_rng", "restore_rng"]


def capture_rng(device: torch.device | None = None) -> dict[str, Any]:
    """This process's random states (torch CPU, Python and, on a CUDA device, that device's)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Set the random states :func:`capture_rng` returned."""
    torch.set_rng_state(state["torch"])
    python = state["python"]
    # weights_only checkpoints return the tuple's inner tuple as a list
    random.setstate((python[0], tuple(python[1]), python[2]) if isinstance(python, list) else python)
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


@dataclass
class TrainState:
    """Counters of a run. ``batch_in_epoch`` counts this epoch's steps already taken (a resumed
    run skips their samples); ``best`` is the best validation force MAE and its step."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best: dict[str, float] = field(default_factory=lambda: {"force_mae": math.inf, "step": -1})

    def advance(self) -> None:
        """One optimiser step taken."""
        self.step += 1
        self.batch_in_epoch += 1

    def end_epoch(self) -> None:
        self.epoch += 1
        self.batch_in_epoch = 0

    def record_validation(self, force_mae: float) -> bool:
        """Note a validation result; whether it is the best so far (NaN never is)."""
        if not force_mae < self.best["force_mae"]:
            return False
        self.best = {"force_mae": float(force_mae), "step": self.step}
        return True

    def state_dict(self, device: torch.device | None = None) -> dict[str, Any]:
        """The counters and this process's random state (``rng``: a list with one entry per
        process; a multi-process trainer gathers them)."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "best": dict(self.best),
            "rng": [capture_rng(device)],
        }

    def load_state_dict(self, state: dict[str, Any], rank: int = 0, device: torch.device | None = None) -> None:
        """Restore the counters and, when ``state`` has it, process ``rank``'s random state."""
        self.step, self.epoch, self.batch_in_epoch = int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"])
        self.best = {"force_mae": float(state["best"]["force_mae"]), "step": int(state["best"]["step"])}
        rng = state.get("rng")
        if rng:
            if rank >= len(rng):
                raise ValueError(f"the saved state has the random state of {len(rng)} processes, not of process {rank}")
            restore_rng(rng[rank], device)

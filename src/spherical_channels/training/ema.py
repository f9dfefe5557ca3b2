"""Exponential moving average of model weights (evaluation and saved models use it)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["ExponentialMovingAverage"]


class ExponentialMovingAverage:
    """``shadow <- decay * shadow + (1 - decay) * weight`` after every optimiser step.

    As in the official trainer, the effective decay warms up as ``min(decay, (1 + n) / (10 + n))``
    after ``n`` updates, so early weights do not dominate. Buffers (normalisation constants)
    are copied, not averaged.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.num_updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._params = {k for k, _ in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for name, value in model.state_dict().items():
            if name in self._params and value.dtype.is_floating_point:
                self.shadow[name].lerp_(value.detach(), 1.0 - decay)
            else:
                self.shadow[name].copy_(value)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)

    @contextlib.contextmanager
    def applied_to(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Temporarily load the averaged weights into ``model`` (e.g. for validation)."""
        backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.shadow)
        try:
            yield model
        finally:
            model.load_state_dict(backup)

"""Learning-rate schedules as pure functions of the optimisation step.

A function of the step (rather than a stateful scheduler object) makes resuming exact by
construction: the checkpoint's step is the whole scheduler state.
"""

from __future__ import annotations

import bisect
import math

from .config import OptimConfig

__all__ = ["learning_rate"]


def learning_rate(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Learning rate at optimisation step ``step`` (0-based).

    Linear warm-up from ``warmup_factor * lr_initial`` to ``lr_initial`` over
    ``warmup_steps``; then ``"step"``: times ``lr_gamma`` per milestone passed (milestones are
    step counts, as in the official configs), or ``"cosine"``: cosine decay to
    ``lr_min_factor * lr_initial`` at ``total_steps``.
    """
    base = optim.lr_initial
    if step < optim.warmup_steps:
        alpha = step / max(1, optim.warmup_steps)
        return base * (optim.warmup_factor * (1.0 - alpha) + alpha)
    if optim.scheduler == "step":
        return base * optim.lr_gamma ** bisect.bisect_right(optim.lr_milestones, step)
    span = max(1, total_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    floor = optim.lr_min_factor
    return base * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))

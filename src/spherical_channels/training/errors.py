"""Why a training run ended early."""

from __future__ import annotations

__all__ = ["TrainingDiverged", "TrainingInterrupted"]


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN or infinite.

    ``reason`` says what (``"non-finite loss"``), ``detail`` what caused it (the structures
    of the batch, by their index in the data set, or the model's weights), ``where`` the step.
    """

    def __init__(self, reason: str, detail: str = "", where: str = "", kept: str = "") -> None:
        self.reason, self.detail, self.where, self.kept = reason, detail, where, kept
        text = reason + (f" {where}" if where else "") + (f": {detail}" if detail else "")
        super().__init__(text + (f"; training stopped, {kept}" if kept else ""))


class TrainingInterrupted(KeyboardInterrupt):
    """A run stopped by a signal (Ctrl-C, SIGTERM) or a callback's stop request with an exit
    code. A ``KeyboardInterrupt``, so that ``except Exception`` does not swallow it.

    Attributes:
        exit_code: what the command exits with (128 + the signal number, as shells report a
            process killed by it: 130 for SIGINT, 143 for SIGTERM).
        step: the step the run stopped at.
        saved: whether ``checkpoints/last.pt`` holds that step (False after a second signal,
            which stops at once).
    """

    def __init__(self, message: str, exit_code: int, step: int, saved: bool) -> None:
        super().__init__(message)
        self.message, self.exit_code, self.step, self.saved = message, exit_code, step, saved

    def __str__(self) -> str:
        return self.message

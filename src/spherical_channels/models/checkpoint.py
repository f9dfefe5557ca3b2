"""Model checkpoints: this package's format, written atomically, and one loader for all.

This package's checkpoints are dictionaries of plain values and tensors only, so they load
with ``torch.load(..., weights_only=True)`` (no code from the file runs)::

    format          "spherical_channels/checkpoint-v1"
    model_config    SCN constructor arguments
    state_dict      the model's weights (raw; with the normalisation buffers)
    ema_state_dict  exponential moving average of the weights, or None
    statistics      data statistics the model was trained with (DatasetStatistics.to_dict())
    config          the full training configuration
    trainer_state   optimiser, step, epoch, RNG states... (absent from exported models)
    metrics         validation metrics at save time

:func:`load_model` reads these and the official implementation's checkpoints alike.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .scn import SCN

__all__ = ["CHECKPOINT_FORMAT", "is_native_checkpoint", "load_checkpoint", "load_model", "read_checkpoint", "save_checkpoint"]

CHECKPOINT_FORMAT = "spherical_channels/checkpoint-v1"


def save_checkpoint(checkpoint: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``checkpoint`` to ``path`` atomically: a temporary file in the same directory is
    written, flushed to disk and renamed over ``path``, so an interruption leaves either the
    old file or the new one, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(dict(checkpoint), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint of this package's format (``weights_only=True``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - report what the file is, not pickle internals
        raise ValueError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    return checkpoint


def read_checkpoint(path: str | Path) -> Mapping[str, Any]:
    """Read a checkpoint file of either kind, this package's or the official one (for
    :func:`load_model`, or to look at its statistics without reading the file again). Tries
    ``weights_only=True`` first; official files that pickle other objects are fully unpickled,
    which runs code from the file: load only files you trust."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    from .fairchem import read_fairchem_checkpoint

    return read_fairchem_checkpoint(path)


def is_native_checkpoint(checkpoint: Mapping[str, Any]) -> bool:
    """Whether ``checkpoint`` is in this package's format (else: the official layout)."""
    return checkpoint.get("format") == CHECKPOINT_FORMAT


def load_model(
    source: str | Path | Mapping[str, Any],
    weights: str = "auto",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **overrides: Any,
) -> SCN:
    """An :class:`SCN` in eval mode from a checkpoint of this package or of the official code.

    Args:
        source: checkpoint path or the loaded dictionary.
        weights: ``"auto"`` (EMA weights when present, as the official calculator does),
            ``"ema"`` (require them) or ``"raw"``.
        device, dtype: where and in which precision to put the model.
        overrides: constructor arguments to change (e.g. ``direct_forces=False`` is not
            allowed for a model trained with direct forces, since it has no force head, but
            ``eval_roll="random"`` or ``regress_forces=False`` are).
    """
    if weights not in ("auto", "ema", "raw"):
        raise ValueError(f"weights must be 'auto', 'ema' or 'raw', got {weights!r}")
    checkpoint = source if isinstance(source, Mapping) else read_checkpoint(source)
    if is_native_checkpoint(checkpoint):
        model = SCN(**{**checkpoint["model_config"], **overrides})
        ema = checkpoint.get("ema_state_dict")
        if weights == "ema" and ema is None:
            raise ValueError("checkpoint has no EMA weights")
        state = ema if (ema is not None and weights in ("auto", "ema")) else checkpoint["state_dict"]
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys:
            raise ValueError(f"checkpoint lacks weights for {result.missing_keys}")
        if result.unexpected_keys and not overrides:
            raise ValueError(f"checkpoint has weights this model does not use: {result.unexpected_keys}")
        model.eval()
    else:
        from .fairchem import load_fairchem_checkpoint

        model = load_fairchem_checkpoint(checkpoint, weights=weights, **overrides)
    return model.to(device=device, dtype=dtype)


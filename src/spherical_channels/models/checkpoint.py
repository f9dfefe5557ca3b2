"""Model checkpoints: the one module that reads and writes them.

This package's checkpoints are dictionaries of plain values and tensors only, so they load with
``torch.load(..., weights_only=True)`` and nothing else (no code from the file runs)::

    format          "spherical_channels/checkpoint-v1"
    model_name      the model's registry name ("scn", "schnet"; absent in older files: "scn")
    model_config    the model's config.to_dict()
    state_dict      the model's weights (raw; with the normalisation buffers)
    ema_state_dict  exponential moving average of the weights, or None
    statistics      data statistics the model was trained with (DatasetStatistics.to_dict())
    config          the full training configuration
    trainer_state   optimiser, step, epoch, RNG states... (absent from exported models)
    metrics         validation metrics at save time

Checkpoints of the official implementations (fairchem / OCP layout, e.g. the released OC20 SCN
and SchNet models) are read too: their ``config["model"]`` names the model, and the
:mod:`.registry` entry that recognises the name converts them. Most load with
``weights_only=True`` as well; those that pickle other Python objects (older trainers' files)
can only be read by full unpickling, which runs code chosen by whoever wrote the file. That
happens only with an explicit opt-in: ``trust_pickle=True`` here, ``--trust-pickle`` on the
command line, and a warning is shown.
"""

from __future__ import annotations

import os
import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..security import OPT_IN_HINT, UntrustedPickleWarning
from .config import ConfigError
from .fairchem import is_official_checkpoint, official_model_name
from .registry import model_spec, official_spec, spec_of

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "UntrustedPickleWarning",
    "is_native_checkpoint",
    "remove_stale_temporaries",
    "load_model",
    "model_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "spherical_channels/checkpoint-v1"



class CheckpointError(ValueError):
    """A file that is not a usable checkpoint (the message names the file and says why)."""


def save_checkpoint(checkpoint: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``checkpoint`` to ``path`` atomically: a temporary file in the same directory is
    written, flushed to disk and renamed over ``path``, so an interruption leaves either the
    old file or the new one, never a truncated one (the temporary file is removed on any error;
    after a hard kill, :func:`remove_stale_temporaries` cleans up)."""
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


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temporary files that :func:`save_checkpoint` leaves when the process is
    killed mid-write; returns them."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = sorted(directory.glob(".*.pt.*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def read_checkpoint(path: str | Path, trust_pickle: bool = False) -> dict[str, Any]:
    """The dictionary in a checkpoint file of either kind (this package's or the official one).

    Loads with ``weights_only=True``. A file that needs full unpickling is refused with a
    :class:`CheckpointError` saying what it holds, unless ``trust_pickle`` is set (then it is
    unpickled, with an :class:`UntrustedPickleWarning`). Every failure names the file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - classify, then report what the file is
        unsafe = _unsafe_globals(path)
        if unsafe is None and not trust_pickle:
            if not zipfile.is_zipfile(path):
                raise CheckpointError(
                    f"{path}: not a torch checkpoint file (if it is an old-format checkpoint "
                    f"that you trust, {OPT_IN_HINT})"
                ) from None
            raise CheckpointError(
                f"{path}: not a readable checkpoint: truncated or corrupt "
                f"({type(err).__name__}: {_first_line(err)})"
            ) from None
        if not trust_pickle:
            raise CheckpointError(
                f"{path}: this checkpoint pickles Python objects ({', '.join(unsafe[:5])}"
                f"{', ...' if len(unsafe) > 5 else ''}), so loading it runs code from the file. "
                f"If you trust the file (e.g. an official OC20 release), {OPT_IN_HINT}"
            ) from None
        warnings.warn(
            f"{path}: unpickling a checkpoint fully (trust_pickle=True): this runs code from the file",
            UntrustedPickleWarning,
            stacklevel=2,
        )
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err2:  # noqa: BLE001
            raise CheckpointError(
                f"{path}: not a readable checkpoint ({type(err2).__name__}: {_first_line(err2)})"
            ) from None
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{path}: holds a {type(checkpoint).__name__}, not a checkpoint dictionary")
    return dict(checkpoint)


def _unsafe_globals(path: Path) -> list[str] | None:
    """The Python objects a zip-format torch file would unpickle beyond the safe ones, or None
    when the file cannot be inspected (corrupt, truncated, or not a torch zip file)."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - anything here means the file is damaged
        return None
    return list(names) or None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else ""


def is_native_checkpoint(checkpoint: Mapping[str, Any]) -> bool:
    """Whether ``checkpoint`` is in this package's format (else: maybe the official layout)."""
    return checkpoint.get("format") == CHECKPOINT_FORMAT


def model_checkpoint(model: nn.Module, ema_state_dict: Mapping[str, torch.Tensor] | None = None, **fields: Any) -> dict[str, Any]:
    """This package's checkpoint dictionary of a built ``model`` (any registered one): format,
    model name, configuration and weights, plus ``fields`` (``statistics``, ``config``,
    ``metrics``, ...). Write it with :func:`save_checkpoint`."""
    return {
        "format": CHECKPOINT_FORMAT,
        "model_name": spec_of(model).name,
        "model_config": model.config.to_dict(),
        "state_dict": model.state_dict(),
        "ema_state_dict": ema_state_dict,
        **fields,
    }


def load_model(
    source: str | Path | Mapping[str, Any],
    weights: str = "auto",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    trust_pickle: bool = False,
    **overrides: Any,
) -> nn.Module:
    """A model in eval mode (an :class:`~.scn.SCN`, :class:`~.schnet.SchNet`, ...: whichever
    the checkpoint holds) from a checkpoint of this package or of the official code, or an
    artefact of ``scn export`` (an :class:`~spherical_channels.deployment.ExportedModel`; its
    code runs on loading, so it needs ``trust_pickle=True``; it takes no ``weights`` or
    ``overrides``, and keeps the dtype and device it was compiled for).

    Args:
        source: checkpoint path or the loaded dictionary (:func:`read_checkpoint`).
        weights: ``"auto"`` (EMA weights when present, as the official calculator does),
            ``"ema"`` (require them) or ``"raw"``.
        device, dtype: where and in which precision to put the model.
        trust_pickle: allow official files that need full unpickling (runs code from the file).
        overrides: configuration options to change (``eval_roll="random"``,
            ``regress_forces=False``, ...; ``direct_forces=False`` is refused for a model trained
            with direct forces only if weights are then missing or unused).

    Raises:
        FileNotFoundError, CheckpointError: the file is missing or not a usable checkpoint.
    """
    if weights not in ("auto", "ema", "raw"):
        raise ValueError(f"weights must be 'auto', 'ema' or 'raw', got {weights!r}")
    if not isinstance(source, Mapping):
        from ..deployment import is_exported_model, load_exported

        if is_exported_model(source):  # reads its metadata only
            if overrides:
                raise CheckpointError(f"{source}: an exported model takes no configuration changes ({sorted(overrides)})")
            return load_exported(source, trust_pickle=trust_pickle).to(device=device, dtype=dtype).eval()
    where = "checkpoint" if isinstance(source, Mapping) else str(source)
    checkpoint = source if isinstance(source, Mapping) else read_checkpoint(source, trust_pickle=trust_pickle)
    try:
        if is_native_checkpoint(checkpoint):
            model = _native_model(checkpoint, weights, overrides)
        elif is_official_checkpoint(checkpoint):
            model = _official_model(checkpoint, weights, overrides)
        else:
            keys = sorted(str(k) for k in checkpoint)[:8]
            raise CheckpointError(
                f"neither this package's checkpoint format nor the official (fairchem/OCP) layout "
                f"(top-level keys: {keys})"
            )
    except (CheckpointError, ConfigError, KeyError, ValueError, RuntimeError) as err:
        message = str(err) if not isinstance(err, KeyError) else f"missing entry {err}"
        raise CheckpointError(f"{where}: {message}") from None
    return model.to(device=device, dtype=dtype).eval()


def _native_model(checkpoint: Mapping[str, Any], weights: str, overrides: Mapping[str, Any]) -> nn.Module:
    raw = checkpoint.get("model_config")
    if not isinstance(raw, Mapping):
        raise CheckpointError("this package's checkpoint without a 'model_config'")
    spec = model_spec(checkpoint.get("model_name", "scn"))  # files from before SchNet hold an SCN
    model = spec.model_class(spec.config_class.from_dict(raw).replace(**overrides))
    ema = checkpoint.get("ema_state_dict")
    if weights == "ema" and ema is None:
        raise CheckpointError("checkpoint has no EMA weights")
    state = ema if (ema is not None and weights in ("auto", "ema")) else checkpoint["state_dict"]
    _load_weights(model, state, allow_unused=bool(overrides))
    return model


def _official_model(checkpoint: Mapping[str, Any], weights: str, overrides: Mapping[str, Any]) -> nn.Module:
    spec = official_spec(official_model_name(checkpoint["config"]))
    official = spec.convert_official(checkpoint, weights=weights, **overrides)
    model = spec.model_class(official.config)
    if official.distance_offsets is not None and hasattr(model.distance_expansion, "set_offsets"):
        model.distance_expansion.set_offsets(official.distance_offsets)
    _load_weights(model, official.state_dict, allow_unused=False, buffers_from_model=True)
    model.set_normalization(**official.normalization)
    return model


def _load_weights(
    model: nn.Module, state: Mapping[str, torch.Tensor], allow_unused: bool, buffers_from_model: bool = False
) -> None:
    """Load ``state`` with errors that say which weights do not fit."""
    expected = model.state_dict()
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if wrong:
        raise CheckpointError(
            "weights do not fit the configuration stored with them (" + "; ".join(wrong[:3]) + ")"
        )
    unexpected = sorted(set(state) - set(expected))
    if unexpected and not allow_unused:
        raise CheckpointError(f"checkpoint has weights this model does not use: {unexpected[:5]}")
    needed = {k for k, _ in model.named_parameters()} if buffers_from_model else set(expected)
    missing = sorted(needed - set(state))
    if missing:
        raise CheckpointError(f"checkpoint lacks weights for {missing[:5]}")
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)


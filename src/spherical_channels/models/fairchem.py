"""Loading checkpoints written by the official SCN implementation (fairchem / OCP trainers).

Layout (the released OC20 SCN checkpoints): a dict with ``state_dict`` (keys prefixed
``module.``), ``config`` (``config["model"] == "scn"`` and ``config["model_attributes"]``, or the
newer ``config["model"] = {"name": "scn", ...}``), ``normalizers`` (energy mean/std, force std)
and ``ema`` (``None`` or ``{"decay", "num_updates", "shadow_params", ...}``: shadow parameters in
the official model's ``parameters()`` order). Like the official calculator, the EMA weights are
used when present.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .scn import SCN

__all__ = ["load_fairchem_checkpoint", "official_to_native_key", "read_fairchem_checkpoint"]

# (official key pattern, native key template). Order matters only for readability.
_KEY_RULES: list[tuple[str, str]] = [
    (r"^sphere_embedding\.(.*)$", r"sphere_embedding.\1"),
    (r"^distance_expansion\.(fc1\..*)$", r"distance_expansion.\1"),
    (r"^edge_blocks\.(\d+)\.dist_block\.fc1_dist\.(.*)$", r"interactions.\1.edge_embedding.distance_linear.\2"),
    (r"^edge_blocks\.(\d+)\.dist_block\.source_embedding\.(.*)$", r"interactions.\1.edge_embedding.source_embedding.\2"),
    (r"^edge_blocks\.(\d+)\.dist_block\.target_embedding\.(.*)$", r"interactions.\1.edge_embedding.target_embedding.\2"),
    (r"^edge_blocks\.(\d+)\.dist_block\.fc1_edge_attr\.(.*)$", r"interactions.\1.edge_embedding.mix.\2"),
    (r"^edge_blocks\.(\d+)\.message_blocks\.(\d+)\.fc1_dist\.(.*)$", r"interactions.\1.message_blocks.\2.edge_gate.\3"),
    (r"^edge_blocks\.(\d+)\.message_blocks\.(\d+)\.fc1_edge_proj\.(.*)$", r"interactions.\1.message_blocks.\2.edge_in.\3"),
    (r"^edge_blocks\.(\d+)\.message_blocks\.(\d+)\.fc1_edge\.(.*)$", r"interactions.\1.message_blocks.\2.hidden.\3"),
    (r"^edge_blocks\.(\d+)\.message_blocks\.(\d+)\.fc2_edge\.(.*)$", r"interactions.\1.message_blocks.\2.edge_out.\3"),
    (r"^edge_blocks\.(\d+)\.downsample\.(.*)$", r"interactions.\1.downsample.\2"),
    (r"^edge_blocks\.(\d+)\.upsample\.(.*)$", r"interactions.\1.upsample.\2"),
    (r"^edge_blocks\.(\d+)\.fc1_sphere\.(.*)$", r"interactions.\1.grid_mlp.0.\2"),
    (r"^edge_blocks\.(\d+)\.fc2_sphere\.(.*)$", r"interactions.\1.grid_mlp.2.\2"),
    (r"^edge_blocks\.(\d+)\.fc3_sphere\.(.*)$", r"interactions.\1.grid_mlp.4.\2"),
    (r"^energy_fc([123])\.(.*)$", r"energy_head.{\1}.\2"),
    (r"^force_fc([123])\.(.*)$", r"force_head.{\1}.\2"),
]
_HEAD_INDEX = {"1": "0", "2": "2", "3": "4"}
# Keys that are buffers, or second names of the shared distance expansion.
_SKIP = re.compile(r"(^|\.)offset$|^edge_blocks\.\d+\.(dist_block\.)?distance_expansion\.")


def _strip_prefix(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module.") :]
    return key


def official_to_native_key(key: str) -> str | None:
    """Native parameter name of an official state-dict key, ``None`` for keys that are skipped
    (buffers that are rebuilt, duplicate names of shared modules)."""
    key = _strip_prefix(key)
    if _SKIP.search(key):
        return None
    for pattern, template in _KEY_RULES:
        match = re.match(pattern, key)
        if match:
            native = match.expand(template)
            return re.sub(r"\{([123])\}", lambda m: _HEAD_INDEX[m.group(1)], native)
    raise KeyError(f"unrecognised key {key!r} in the SCN checkpoint")


def _model_attributes(config: Mapping[str, Any]) -> dict[str, Any]:
    if "model_attributes" in config:
        name, attrs = config.get("model"), dict(config["model_attributes"])
    elif isinstance(config.get("model"), Mapping):
        attrs = dict(config["model"])
        name = attrs.pop("name", None)
    else:
        raise ValueError("checkpoint config has neither 'model_attributes' nor a 'model' section")
    if name not in ("scn", "spherical_channel_network", None):
        raise ValueError(f"checkpoint is for model {name!r}, not SCN")
    return attrs


def _scalar(value: Any, default: float) -> float:
    if value is None:
        return default
    return float(np.asarray(torch.as_tensor(value).double()).reshape(-1)[0])


def read_fairchem_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read an official checkpoint dict. Tries ``weights_only=True`` first; older checkpoints
    that pickle other objects need ``weights_only=False``, which runs code from the file, so it
    is only attempted for files the user chose to load."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any unpickling refusal: retry with full unpickling
        return torch.load(path, map_location="cpu", weights_only=False)


def load_fairchem_checkpoint(
    path: str | Path | Mapping[str, Any], weights: str = "auto", **overrides: Any
) -> SCN:
    """Build an :class:`SCN` from an official checkpoint and load its weights.

    Args:
        path: checkpoint file (or the already-loaded dict).
        weights: ``"auto"`` (EMA weights if the checkpoint has them, as the official calculator
            does), ``"ema"`` (require them) or ``"raw"`` (the ``state_dict``).
        overrides: constructor arguments to change, e.g. ``roll="fixed"`` or
            ``direct_forces=False``.

    Returns:
        The model in eval mode, with the checkpoint's target normalisation folded in.
    """
    checkpoint = read_fairchem_checkpoint(path) if not isinstance(path, Mapping) else path
    attrs = _model_attributes(checkpoint["config"])
    attrs.update(overrides)
    model = SCN(**attrs)

    official = checkpoint["state_dict"]
    # The official model uses its distance centres as stored (float32 even in a float64 run).
    offsets = official.get("module.distance_expansion.offset", official.get("distance_expansion.offset"))
    if offsets is not None and hasattr(model.distance_expansion, "set_offsets"):
        model.distance_expansion.set_offsets(offsets)
    native_state = model.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    param_keys: list[str] = []  # official parameter names in parameters() order (for the EMA)
    for key, value in official.items():
        native = official_to_native_key(key)
        if native is None:
            continue
        if native not in native_state:
            raise KeyError(f"checkpoint key {key!r} maps to {native!r}, which this model lacks")
        if native_state[native].shape != value.shape:
            raise ValueError(
                f"shape mismatch for {key!r}: checkpoint {tuple(value.shape)}, model {tuple(native_state[native].shape)}"
            )
        loaded[native] = value
        param_keys.append(native)
    expected = {k for k, _ in model.named_parameters()}
    missing = expected - set(loaded)
    if missing:
        raise KeyError(f"checkpoint lacks parameters {sorted(missing)}")

    ema = checkpoint.get("ema")
    if weights not in ("auto", "ema", "raw"):
        raise ValueError(f"weights must be 'auto', 'ema' or 'raw', got {weights!r}")
    if weights == "ema" and not ema:
        raise ValueError("checkpoint has no EMA weights")
    if ema and weights in ("auto", "ema"):
        shadow = ema["shadow_params"]
        if len(shadow) != len(param_keys):
            raise ValueError(
                f"EMA has {len(shadow)} tensors but the state dict {len(param_keys)} parameters"
            )
        for native, value in zip(param_keys, shadow):
            if value.shape != loaded[native].shape:
                raise ValueError(f"EMA tensor for {native!r} has shape {tuple(value.shape)}")
            loaded[native] = value
    model.load_state_dict(loaded, strict=False)

    normalizers = checkpoint.get("normalizers") or {}
    energy_norm = normalizers.get("target") or {}
    force_norm = normalizers.get("grad_target") or {}
    model.energy_scale.fill_(_scalar(energy_norm.get("std"), 1.0))
    model.energy_shift.fill_(_scalar(energy_norm.get("mean"), 0.0))
    model.force_scale.fill_(_scalar(force_norm.get("std"), 1.0))
    return model.eval()

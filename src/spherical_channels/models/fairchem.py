"""Converting checkpoints written by the official SCN implementation (fairchem / OCP trainers),
and what every official checkpoint shares (model name, attributes, normalisers, EMA weights).

This module turns an official checkpoint dictionary into this package's pieces (configuration,
state dict with native names, normalisation) without building a model: reading files and
building models are :mod:`.checkpoint`'s job (``load_model``); :mod:`.registry` says which
converter reads which official model (SchNet's is :mod:`.fairchem_schnet`).

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
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .config import ConfigError, SCNConfig

__all__ = [
    "OfficialModel",
    "convert_official_checkpoint",
    "is_official_checkpoint",
    "official_attributes",
    "official_model_name",
    "official_normalization",
    "official_to_native_key",
    "select_weights",
]

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


@dataclass
class OfficialModel:
    """What an official checkpoint holds, in this package's terms.

    Attributes:
        config: the model's configuration (an ``SCNConfig``, ``SchNetConfig``, ...).
        state_dict: parameters under native names (EMA weights when chosen).
        distance_offsets: the distance expansion's centres as stored (the official model uses
            them as they are: float32 even in a float64 run), or None.
        normalization: ``energy_scale``, ``energy_shift``, ``force_scale`` (the official
            "normalizers"), for ``SCN.set_normalization``.
    """

    config: Any
    state_dict: dict[str, torch.Tensor]
    distance_offsets: torch.Tensor | None
    normalization: dict[str, float]


def is_official_checkpoint(checkpoint: Mapping[str, Any]) -> bool:
    """Whether ``checkpoint`` has the official trainers' layout (``state_dict`` and ``config``)."""
    return isinstance(checkpoint.get("state_dict"), Mapping) and isinstance(checkpoint.get("config"), Mapping)


def official_attributes(config: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """``(model name, constructor arguments)`` of an official checkpoint's ``config``: the
    released OC20 layout (``config["model"] = "scn"`` and ``config["model_attributes"]``) or
    the newer one (``config["model"] = {"name": "scn", ...}``); the name may be None."""
    if "model_attributes" in config:
        name, attrs = config.get("model"), dict(config["model_attributes"])
    elif isinstance(config.get("model"), Mapping):
        attrs = dict(config["model"])
        name = attrs.pop("name", None)
    else:
        raise ConfigError("checkpoint config has neither 'model_attributes' nor a 'model' section")
    return (None if name is None else str(name)), attrs


def official_model_name(config: Mapping[str, Any]) -> str | None:
    """The model name an official checkpoint's ``config`` gives (``"scn"``, ``"schnet"``, ...)."""
    return official_attributes(config)[0]


def _model_attributes(config: Mapping[str, Any]) -> dict[str, Any]:
    name, attrs = official_attributes(config)
    if name not in ("scn", "spherical_channel_network", None):
        raise ConfigError(f"checkpoint is for model {name!r}, not SCN")
    return attrs


def _scalar(value: Any, default: float) -> float:
    if value is None:
        return default
    return float(np.asarray(torch.as_tensor(value).double()).reshape(-1)[0])


def official_normalization(checkpoint: Mapping[str, Any]) -> dict[str, float]:
    """``energy_scale``, ``energy_shift``, ``force_scale`` from the official "normalizers"
    (predictions are de-normalised as ``E * std + mean`` and ``F * grad_std``)."""
    normalizers = checkpoint.get("normalizers") or {}
    energy_norm = normalizers.get("target") or {}
    force_norm = normalizers.get("grad_target") or {}
    return {
        "energy_scale": _scalar(energy_norm.get("std"), 1.0),
        "energy_shift": _scalar(energy_norm.get("mean"), 0.0),
        "force_scale": _scalar(force_norm.get("std"), 1.0),
    }


def select_weights(
    checkpoint: Mapping[str, Any], loaded: dict[str, torch.Tensor], param_keys: list[str], weights: str
) -> dict[str, torch.Tensor]:
    """``loaded`` (native names) with the EMA weights put in when ``weights`` asks for them
    (``"auto"``: when present; ``"ema"``: required; ``"raw"``: never). The official EMA holds
    its tensors in the model's ``parameters()`` order, which ``param_keys`` gives."""
    if weights not in ("auto", "ema", "raw"):
        raise ValueError(f"weights must be 'auto', 'ema' or 'raw', got {weights!r}")
    ema = checkpoint.get("ema")
    if weights == "ema" and not ema:
        raise ValueError("checkpoint has no EMA weights")
    if ema and weights in ("auto", "ema"):
        shadow = ema["shadow_params"]
        if len(shadow) != len(param_keys):
            raise ValueError(f"EMA has {len(shadow)} tensors but the state dict {len(param_keys)} parameters")
        for native, value in zip(param_keys, shadow):
            if value.shape != loaded[native].shape:
                raise ValueError(f"EMA tensor for {native!r} has shape {tuple(value.shape)}")
            loaded[native] = value
    return loaded


def convert_official_checkpoint(
    checkpoint: Mapping[str, Any], weights: str = "auto", **overrides: Any
) -> OfficialModel:
    """The configuration, native state dict and normalisation of an official checkpoint.

    Args:
        checkpoint: the loaded dictionary.
        weights: ``"auto"`` (EMA weights if the checkpoint has them, as the official calculator
            does), ``"ema"`` (require them) or ``"raw"`` (the ``state_dict``).
        overrides: configuration options to change, e.g. ``roll="fixed"``.
    """
    if weights not in ("auto", "ema", "raw"):
        raise ValueError(f"weights must be 'auto', 'ema' or 'raw', got {weights!r}")
    config = SCNConfig.from_official(_model_attributes(checkpoint["config"]))
    if overrides:
        config = config.replace(**overrides)

    official = checkpoint["state_dict"]
    offsets = official.get("module.distance_expansion.offset", official.get("distance_expansion.offset"))
    loaded: dict[str, torch.Tensor] = {}
    param_keys: list[str] = []  # native names in the official parameters() order (for the EMA)
    for key, value in official.items():
        native = official_to_native_key(key)
        if native is None:
            continue
        loaded[native] = value
        param_keys.append(native)

    loaded = select_weights(checkpoint, loaded, param_keys, weights)
    return OfficialModel(config, loaded, offsets, official_normalization(checkpoint))

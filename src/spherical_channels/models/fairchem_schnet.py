"""Converting checkpoints of the official OC20 SchNet (fairchem / OCP ``SchNetWrap``).

The layout is the official trainers' (see :mod:`.fairchem`): ``config["model"] == "schnet"``
with ``config["model_attributes"]`` (or ``config["model"] = {"name": "schnet", ...}``), a
``state_dict`` prefixed ``module.``, "normalizers" and an optional EMA. In the state dict each
interaction's filter network appears twice, as ``interactions.k.mlp.*`` and
``interactions.k.conv.nn.*`` (one module registered under two names); the distance
expansion's centres are the buffer ``distance_expansion.offset``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from .config import ConfigError
from .fairchem import OfficialModel, official_attributes, official_normalization, select_weights
from .schnet_config import SchNetConfig

__all__ = ["convert_official_schnet_checkpoint", "official_schnet_key"]

# (official key pattern, native key template)
_KEY_RULES: list[tuple[str, str]] = [
    (r"^embedding\.weight$", r"embedding.weight"),
    (r"^distance_expansion\.offset$", r"distance_expansion.offset"),
    (r"^interactions\.(\d+)\.mlp\.([02])\.(weight|bias)$", r"interactions.\1.filter_net.\2.\3"),
    (r"^interactions\.(\d+)\.conv\.lin1\.weight$", r"interactions.\1.neighbor_linear.weight"),
    (r"^interactions\.(\d+)\.conv\.lin2\.(weight|bias)$", r"interactions.\1.message_linear.\2"),
    (r"^interactions\.(\d+)\.lin\.(weight|bias)$", r"interactions.\1.update_linear.\2"),
    (r"^lin1\.(weight|bias)$", r"output.0.\1"),
    (r"^lin2\.(weight|bias)$", r"output.2.\1"),
]
# The second name of each interaction's filter network (the same tensors as its ".mlp.").
_DUPLICATE = re.compile(r"^(interactions\.\d+\.)conv\.nn\.([02]\.(?:weight|bias))$")
_BUFFERS = frozenset({"distance_expansion.offset"})


def _strip_prefix(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module.") :]
    return key


def official_schnet_key(key: str) -> str | None:
    """Native name of an official SchNet state-dict key; ``None`` for the filter networks'
    second names (``conv.nn.*``)."""
    key = _strip_prefix(key)
    if _DUPLICATE.match(key):
        return None
    for pattern, template in _KEY_RULES:
        match = re.match(pattern, key)
        if match:
            return match.expand(template)
    raise KeyError(f"unrecognised key {key!r} in the SchNet checkpoint")


def convert_official_schnet_checkpoint(
    checkpoint: Mapping[str, Any], weights: str = "auto", **overrides: Any
) -> OfficialModel:
    """The configuration, native state dict and normalisation of an official SchNet checkpoint.

    Args:
        checkpoint: the loaded dictionary.
        weights: ``"auto"`` (EMA weights if the checkpoint has them, as the official calculator
            does), ``"ema"`` (require them) or ``"raw"`` (the ``state_dict``).
        overrides: configuration options to change, e.g. ``regress_forces=False``.

    Raises:
        ConfigError: the checkpoint is for another model, or its attributes are not SchNet's.
        KeyError, ValueError: state-dict keys this converter does not know, the two names of a
            filter network holding different tensors, an EMA that does not fit, or normalisers
            that give the forces another scale than the energy (the forces are ``-dE/dx``).
    """
    name, attributes = official_attributes(checkpoint["config"])
    if name is not None and name.lower() != "schnet":
        raise ConfigError(f"checkpoint is for model {name!r}, not SchNet")
    config = SchNetConfig.from_official(attributes)
    if overrides:
        config = config.replace(**overrides)

    official = {_strip_prefix(k): v for k, v in checkpoint["state_dict"].items()}
    loaded: dict[str, torch.Tensor] = {}
    param_keys: list[str] = []  # native names in the official parameters() order (for the EMA)
    for key, value in official.items():
        duplicate = _DUPLICATE.match(key)
        if duplicate:
            first = official.get(f"{duplicate.group(1)}mlp.{duplicate.group(2)}")
            if first is not None and not torch.equal(first, value):
                raise ValueError(
                    f"{key!r} differs from {duplicate.group(1)}mlp.{duplicate.group(2)!s}: the official model "
                    f"stores one filter network under both names"
                )
            continue
        native = official_schnet_key(key)
        loaded[native] = value
        if native not in _BUFFERS:
            param_keys.append(native)
    loaded = select_weights(checkpoint, loaded, param_keys, weights)

    normalization = official_normalization(checkpoint)
    energy_scale, force_scale = normalization["energy_scale"], normalization["force_scale"]
    if not math.isclose(energy_scale, force_scale, rel_tol=1e-6):
        raise ValueError(
            f"the checkpoint's normalizers scale energies by {energy_scale} but forces by {force_scale}: the "
            f"official model's forces are then not -dE/dx of its energy, which this SchNet (forces -dE/dx) "
            f"cannot reproduce"
        )
    return OfficialModel(config, loaded, None, normalization)

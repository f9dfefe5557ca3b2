"""Converting checkpoints of the official SpinConv (OCP ``ocpmodels/models/spinconv.py``).

The layout is the official trainers' (see :mod:`.fairchem`): ``config["model"] == "spinconv"``
with ``config["model_attributes"]`` (or ``config["model"] = {"name": "spinconv", ...}``), a
``state_dict`` prefixed ``module.``, "normalizers" and an optional EMA. The distance
expansion's centres are one buffer stored under two names
(``distance_expansion_forces.offset`` and ``dist_block.distance_expansion.offset``).

An official checkpoint loads with the official behaviour: ``exact_gradient=False`` (an
energy-centric model's forces are the official partial gradient) and the fixtures' fixed
force frames in eval mode; pass ``exact_gradient=True`` (energy-conserving forces of the same
energy) or ``eval_force_rotations=...`` as overrides to change them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from .config import ConfigError
from .fairchem import OfficialModel, official_attributes, official_normalization, select_weights
from .spinconv_config import SpinConvConfig

if TYPE_CHECKING:
    from .spinconv import SpinConv

__all__ = ["convert_official_spinconv_checkpoint", "is_official_spinconv", "official_spinconv_key", "spinconv_from_official"]

_MIX = r"(fc1|fc2|fc3|source_embedding|target_embedding|embed_fc1)"
_MIX_NAMES = {
    "fc1": "input_linear",
    "fc2": "basis_linear",
    "fc3": "output_linear",
    "source_embedding": "source_embedding",
    "target_embedding": "target_embedding",
    "embed_fc1": "basis_weights",
}
_SPIN = r"spinconvblock\.(conv1|GroupNorm|mlp|sph_froms2grid)\.(.+)"
_SPIN_NAMES = {"conv1": "conv", "GroupNorm": "norm", "mlp": "harmonics_linear", "sph_froms2grid": "to_harmonics"}

# (official key pattern, function of the match -> native key)
_KEY_RULES: list[tuple[re.Pattern, Any]] = [
    (re.compile(r"^distance_expansion_forces\.offset$"), lambda m: "distance_expansion.offset"),
    (re.compile(rf"^embeddingblock2\.{_MIX}\.(.+)$"), lambda m: f"initial_mix.{_MIX_NAMES[m[1]]}.{m[2]}"),
    (re.compile(r"^distfc([12])\.(weight|bias)$"), lambda m: f"initial_mlp.{2 * (int(m[1]) - 1)}.{m[2]}"),
    (re.compile(r"^dist_block\.dist_scalar\.weight$"), lambda m: "edge_distance.pair_scale.weight"),
    (re.compile(r"^dist_block\.dist_offset\.weight$"), lambda m: "edge_distance.pair_shift.weight"),
    (re.compile(r"^dist_block\.fc1\.(weight|bias)$"), lambda m: f"edge_distance.linear.{m[1]}"),
    (re.compile(rf"^message_blocks\.(\d+)\.{_SPIN}$"), lambda m: f"message_blocks.{m[1]}.spin.{_SPIN_NAMES[m[2]]}.{m[3]}"),
    (re.compile(rf"^message_blocks\.(\d+)\.embeddingblock([12])\.{_MIX}\.(.+)$"),
     lambda m: f"message_blocks.{m[1]}.{'mix_in' if m[2] == '1' else 'mix_out'}.{_MIX_NAMES[m[3]]}.{m[4]}"),
    (re.compile(r"^message_blocks\.(\d+)\.distfc([12])\.(weight|bias)$"),
     lambda m: f"message_blocks.{m[1]}.distance_mlp.{2 * (int(m[2]) - 1)}.{m[3]}"),
    (re.compile(rf"^energyembeddingblock\.{_MIX}\.(.+)$"), lambda m: f"energy_head.{_MIX_NAMES[m[1]]}.{m[2]}"),
    (re.compile(rf"^force_output_block\.{_SPIN}$"), lambda m: f"force_head.spin.{_SPIN_NAMES[m[1]]}.{m[2]}"),
    (re.compile(rf"^force_output_block\.block([12])\.{_MIX}\.(.+)$"),
     lambda m: f"force_head.{'mix_in' if m[1] == '1' else 'mix_out'}.{_MIX_NAMES[m[2]]}.{m[3]}"),
]
# The second name of the distance expansion's centres (the same buffer).
_DUPLICATE = "dist_block.distance_expansion.offset"
# e3nn's FromS2Grid buffers (the "rotspharmwd" message): loaded as stored, not parameters.
_HARMONIC_BUFFERS = re.compile(r"\.to_harmonics\.(alphas|betas|sha|shb)$")


def _strip_prefix(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module.") :]
    return key


def official_spinconv_key(key: str) -> str | None:
    """Native name of an official SpinConv state-dict key; ``None`` for the distance
    centres' second name."""
    key = _strip_prefix(key)
    if key == _DUPLICATE:
        return None
    for pattern, native in _KEY_RULES:
        match = pattern.match(key)
        if match:
            return native(match)
    raise KeyError(f"unrecognised key {key!r} in the SpinConv checkpoint")


def is_official_spinconv(official_name: str | None) -> bool:
    """Whether an official checkpoint's ``config["model"]`` names SpinConv."""
    return official_name is not None and official_name.lower() == "spinconv"


def convert_official_spinconv_checkpoint(
    checkpoint: Mapping[str, Any], weights: str = "auto", **overrides: Any
) -> OfficialModel:
    """The configuration, native state dict and normalisation of an official SpinConv
    checkpoint (the dictionary :func:`~.checkpoint.read_checkpoint` returns).

    Args:
        checkpoint: the loaded dictionary.
        weights: ``"auto"`` (EMA weights if the checkpoint has them, as the official calculator
            does), ``"ema"`` (require them) or ``"raw"`` (the ``state_dict``).
        overrides: configuration options to change, e.g. ``exact_gradient=True`` or
            ``eval_force_rotations="fixed_shared"``.

    Returns:
        ``OfficialModel(config, state_dict, None, normalization)``: build
        ``SpinConv(config)``, load the state dict (every parameter; buffers not in it keep the
        model's), then ``set_normalization(**normalization)``.

    Raises:
        ConfigError: the checkpoint is for another model, or its attributes are not SpinConv's.
        KeyError, ValueError: state-dict keys this converter does not know, the two names of
            the distance centres holding different values, or an EMA that does not fit.
    """
    name, attributes = official_attributes(checkpoint["config"])
    if name is not None and not is_official_spinconv(name):
        raise ConfigError(f"checkpoint is for model {name!r}, not SpinConv")
    config = SpinConvConfig.from_official(attributes)
    if overrides:
        config = config.replace(**overrides)

    official = {_strip_prefix(k): v for k, v in checkpoint["state_dict"].items()}
    first, second = official.get("distance_expansion_forces.offset"), official.get(_DUPLICATE)
    if first is not None and second is not None and not torch.equal(first, second):
        raise ValueError(f"{_DUPLICATE!r} differs from 'distance_expansion_forces.offset': the official model stores one buffer under both names")
    loaded: dict[str, torch.Tensor] = {}
    param_keys: list[str] = []  # native names in the official parameters() order (for the EMA)
    for key, value in official.items():
        native = official_spinconv_key(key)
        if native is None:
            continue
        loaded[native] = value
        if native != "distance_expansion.offset" and not _HARMONIC_BUFFERS.search(native):
            param_keys.append(native)
    loaded = select_weights(checkpoint, loaded, param_keys, weights)
    return OfficialModel(config, loaded, None, official_normalization(checkpoint))


def spinconv_from_official(checkpoint: Mapping[str, Any], weights: str = "auto", **overrides: Any) -> "SpinConv":
    """A :class:`~.spinconv.SpinConv` in eval mode from an official checkpoint dictionary
    (what :func:`~.checkpoint.load_model` does for every registered model, here without the
    registry): converted, every parameter loaded, normalisation set.

    Raises:
        ValueError: weights missing, unexpected or of the wrong shape (and as
            :func:`convert_official_spinconv_checkpoint`).
    """
    from .spinconv import SpinConv

    official = convert_official_spinconv_checkpoint(checkpoint, weights=weights, **overrides)
    model = SpinConv(official.config)
    expected = model.state_dict()
    wrong = [f"{k}: checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)}"
             for k, v in official.state_dict.items() if k in expected and v.shape != expected[k].shape]
    if wrong:
        raise ValueError("weights do not fit the configuration stored with them (" + "; ".join(wrong[:3]) + ")")
    unexpected = sorted(set(official.state_dict) - set(expected))
    missing = sorted({k for k, _ in model.named_parameters()} - set(official.state_dict))
    if unexpected or missing:
        raise ValueError(f"checkpoint weights do not match a SpinConv: unexpected {unexpected[:5]}, missing {missing[:5]}")
    model.load_state_dict(official.state_dict, strict=False)
    model.set_normalization(**official.normalization)
    return model.eval()

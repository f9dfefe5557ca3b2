"""The models this package implements, by name: one :class:`ModelSpec` per model.

Everything that builds a model from a name goes through here: the trainer (``model.name`` of
a training configuration), the checkpoint reader (this package's checkpoints store the name;
official ones are recognised by their ``config["model"]``) and the command line. A model
provides the SCN's interface (``config``, ``conservative``, ``regress_forces``,
``energy_terms``, ``forward``, ``build_graph``, ``set_normalization``; its config class
``from_official``, ``from_dict``, ``to_dict``, ``replace`` and the graph options ``cutoff``,
``neighbor_cap``, ``neighbor_ties``, ``max_num_elements``). Adding a model is one
:func:`register_model` call at the end of this module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .config import ConfigError, SCNConfig
from .fairchem import OfficialModel, convert_official_checkpoint
from .fairchem_schnet import convert_official_schnet_checkpoint
from .schnet import SchNet, SchNetConfig
from .scn import SCN
from .spinconv import SpinConv
from .spinconv_config import SpinConvConfig
from .spinconv_official import convert_official_spinconv_checkpoint

__all__ = [
    "ModelSpec",
    "build_model",
    "model_names",
    "model_spec",
    "official_spec",
    "register_model",
    "spec_of",
]


@dataclass(frozen=True)
class ModelSpec:
    """What the package needs to know of one model.

    Attributes:
        name: the name in configurations and checkpoints (``model: {name: ...}``).
        model_class: built as ``model_class(config)``.
        config_class: its frozen configuration (``from_official``, ``from_dict``, ...).
        convert_official: ``(checkpoint, weights, **overrides) -> OfficialModel`` for a
            checkpoint of the official implementation.
        official_names: the names official checkpoints give the model in ``config["model"]``
            (the recogniser); ``name`` is always one of them.
        new_model_defaults: options a newly trained model gets unless its configuration says
            otherwise (official checkpoints keep the config class's defaults).
        description: one line for messages and help texts.
    """

    name: str
    model_class: type[nn.Module]
    config_class: type
    convert_official: Callable[..., OfficialModel]
    official_names: tuple[str, ...] = ()
    new_model_defaults: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    def build(self, options: Mapping[str, Any] | None = None) -> nn.Module:
        """A fresh model from official-style ``options`` (constructor arguments, a ``model:``
        section with or without ``name``)."""
        return self.model_class(self.config_class.from_official(dict(options or {})))

    def recognises(self, official_name: str | None) -> bool:
        """Whether an official checkpoint naming its model ``official_name`` is this model's."""
        return official_name is not None and official_name.lower() in {self.name, *self.official_names}


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add ``spec`` (its name and official names must be new)."""
    taken = {spec.name, *spec.official_names} & {n for s in _REGISTRY.values() for n in (s.name, *s.official_names)}
    if taken:
        raise ValueError(f"model names {sorted(taken)} are registered already")
    _REGISTRY[spec.name] = spec
    return spec


def model_names() -> tuple[str, ...]:
    """The registered models' names."""
    return tuple(_REGISTRY)


def model_spec(name: str) -> ModelSpec:
    """The spec of the model called ``name`` (its name or an official one, any case); a
    :class:`~.config.ConfigError` listing the known names otherwise."""
    key = str(name).lower()
    for spec in _REGISTRY.values():
        if key == spec.name or key in spec.official_names:
            return spec
    raise ConfigError(f"unknown model {name!r}; this package implements {', '.join(model_names())}")


def official_spec(official_name: str | None) -> ModelSpec:
    """The spec reading official checkpoints of ``official_name`` (``None``, the name a very
    old config may lack: SCN, the package's first model)."""
    if official_name is None:
        return _REGISTRY["scn"]
    for spec in _REGISTRY.values():
        if spec.recognises(official_name):
            return spec
    raise ConfigError(
        f"checkpoint is for model {official_name!r}, which this package does not implement "
        f"(it reads {', '.join(model_names())})"
    )


def spec_of(model: nn.Module) -> ModelSpec:
    """The spec of a built model: its class's, else the nearest registered base class's."""
    for cls in type(model).__mro__:
        for spec in _REGISTRY.values():
            if spec.model_class is cls:
                return spec
    raise TypeError(f"{type(model).__name__} is not a registered model ({', '.join(model_names())})")


def build_model(name: str, options: Mapping[str, Any] | None = None) -> nn.Module:
    """A fresh model called ``name`` from official-style ``options``."""
    return model_spec(name).build(options)


register_model(ModelSpec(
    name="scn",
    model_class=SCN,
    config_class=SCNConfig,
    convert_official=convert_official_checkpoint,
    official_names=("scn", "spherical_channel_network"),
    # the ZBL repulsion prior only acts at distances training data does not reach (well below
    # bond lengths) and keeps atoms from collapsing there
    new_model_defaults={"zbl": True},
    description="Spherical Channel Network (Zitnick et al. 2022)",
))
register_model(ModelSpec(
    name="schnet",
    model_class=SchNet,
    config_class=SchNetConfig,
    convert_official=convert_official_schnet_checkpoint,
    official_names=("schnet",),
    description="SchNet (Schütt et al. 2017), the OC20 baseline",
))
register_model(ModelSpec(
    name="spinconv",
    model_class=SpinConv,
    config_class=SpinConvConfig,
    convert_official=convert_official_spinconv_checkpoint,
    official_names=("spinconv",),
    # new models: energy-centric forces as the true -dE/dx, and force frames that do not depend
    # on atom order (official checkpoints keep the official behaviour)
    new_model_defaults={"exact_gradient": True, "eval_force_rotations": "fixed_shared"},
    description="SpinConv (Shuaibi et al. 2021), the OC20 baseline",
))

"""The configuration of an SCN: one frozen, validated record per model.

:class:`SCNConfig` holds every constructor argument of the official implementation (same names,
same defaults) plus this package's additions. A model is built from it, exposes it read-only
(``model.config``), and checkpoints store ``config.to_dict()``; nothing else describes a model.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

__all__ = ["ConfigError", "ModelConfig", "SCNConfig", "RUNTIME_OPTIONS", "UNCAPPED"]

Roll = Literal["random", "fixed"]
DistanceFunction = Literal["gaussian", "sigmoid", "linearsigmoid", "silu"]
SphereWeighting = Literal["fairchem", "quadrature"]
NeighborTies = Literal["official", "shell"]

#: Official constructor arguments that describe the data, not the model (the OCP trainer passes
#: them positionally); :meth:`SCNConfig.from_official` drops them.
_OFFICIAL_DATA_ARGUMENTS = ("num_atoms", "bond_feat_dim", "num_targets")

#: Options that change how a model is evaluated but not its parameters; a built model may change
#: them with ``model.update_config(...)``.
RUNTIME_OPTIONS = frozenset({"roll", "eval_roll", "show_timing_info"})

#: The smooth variant's neighbour "cap": none (every pair within the cutoff).
UNCAPPED = 2**62


class ConfigError(ValueError):
    """A model configuration that cannot be built (the message names the option)."""


class ModelConfig:
    """What every model's frozen configuration record shares (a base of frozen dataclasses).

    A subclass is a ``@dataclass(frozen=True)`` of options with type hints and defaults, sets
    ``LABEL`` (the name in messages) and ``OFFICIAL_NAMES`` (``model:`` names it answers to,
    the first is the default), and may add range checks in ``_check_ranges``. Values are
    coerced to their hints on construction (ints for floats, integral floats for ints, as YAML
    and JSON give them); anything else is a :class:`ConfigError` naming the option.
    """

    LABEL: typing.ClassVar[str] = "model"
    OFFICIAL_NAMES: typing.ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):  # type: ignore[arg-type]
            object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        self._check_ranges()

    def _check_ranges(self) -> None:
        """Raise :class:`ConfigError` for values outside their range (none by default)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (stored in checkpoints, written to YAML)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]):  # noqa: ANN206 - the subclass
        """A config from this package's keys; unknown keys are an error naming them."""
        values = dict(values)
        unknown = set(values) - cls.option_names()
        if unknown:
            raise ConfigError(f"unknown {cls.LABEL} options {sorted(unknown)}; known: {sorted(cls.option_names())}")
        return cls(**values)

    @classmethod
    def from_official(cls, attributes: Mapping[str, Any]):  # noqa: ANN206 - the subclass
        """A config from an official ``model_attributes`` dict (or a ``model:`` section with a
        ``name``): the data arguments the OCP trainer passes (``num_atoms``, ...) are dropped."""
        values = {k: v for k, v in attributes.items() if k not in _OFFICIAL_DATA_ARGUMENTS}
        name = values.pop("name", cls.OFFICIAL_NAMES[0])
        if str(name).lower() not in cls.OFFICIAL_NAMES:
            raise ConfigError(f"configuration is for model {name!r}, not {cls.LABEL}")
        return cls.from_dict(values)

    @classmethod
    def option_names(cls) -> frozenset[str]:
        """Names of every option (computed once: models' attribute lookups ask often)."""
        names = cls.__dict__.get("_option_names")
        if names is None:
            names = frozenset(f.name for f in fields(cls))  # type: ignore[arg-type]
            type.__setattr__(cls, "_option_names", names)
        return names

    def replace(self, **changes: Any):  # noqa: ANN201 - the subclass
        """A copy with ``changes`` (validated again)."""
        unknown = set(changes) - self.option_names()
        if unknown:
            raise ConfigError(f"unknown {self.LABEL} options {sorted(unknown)}")
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclass(frozen=True)
class SCNConfig(ModelConfig):
    """Every option of an SCN (official names and defaults first, then this package's).

    Official options (fairchem ``SCN``): ``use_pbc``, ``use_pbc_single``, ``regress_forces``,
    ``otf_graph``, ``max_num_neighbors``, ``cutoff`` (Å), ``max_num_elements``,
    ``num_interactions``, ``lmax``, ``mmax``, ``num_resolutions``, ``sphere_channels``,
    ``sphere_channels_reduce``, ``hidden_channels``, ``num_taps`` (-1: the official default
    number of taps for ``mmax``), ``use_grid``, ``num_bands``, ``num_sphere_samples``,
    ``num_basis_functions``, ``distance_function``, ``basis_width_scalar``,
    ``distance_resolution``, ``show_timing_info``. ``use_pbc``, ``use_pbc_single``,
    ``otf_graph`` and ``show_timing_info`` are kept for compatibility: periodicity comes from each
    structure's ``pbc`` and the graph is always built by the model.

    Additions:
        direct_forces: ``True``: forces from the force head (the paper); ``False``: forces are
            ``-dE/dx`` (energy-conserving; stress available).
        roll: roll rule of the edge frames in training mode (``"random"``, the paper, or
            ``"fixed"``).
        eval_roll: roll rule in eval mode (``"fixed"``: deterministic inference); ``None`` means
            ``roll``.
        edge_rotation: ``False`` is the paper's "no rotation" ablation (identity frames).
        sphere_weighting: ``"fairchem"`` (the official output points) or ``"quadrature"``.
        neighbor_ties: how distances tied at the neighbour cap and at the resolution boundary are
            broken: ``"official"`` (as the official code: by edge order, which follows atom order)
            or ``"shell"`` (independent of atom order; see :mod:`spherical_channels.data.neighbors`).
        smooth: the smooth variant (:mod:`spherical_channels.models.smooth`): an envelope takes
            every message and its first two derivatives to zero at the cutoff, no neighbour
            cap (``max_num_neighbors`` is ignored), resolutions by distance and blended frames.
            The energy is then C2 in the positions and independent of atom order.
        resolution_distance, resolution_band: with ``smooth`` and two resolutions, edges
            shorter than ``resolution_distance - band/2`` (Å) use the full resolution, longer
            than ``resolution_distance + band/2`` the reduced one, blended in between.
        envelope_exponent: exponent p of the polynomial envelope (smooth variant and ZBL).
        zbl: add the ZBL screened nuclear repulsion (:mod:`spherical_channels.models.repulsion`)
            to the energy; it vanishes beyond ``zbl_radius_scale`` x the sum of the two
            covalent radii.
    """

    use_pbc: bool = True
    use_pbc_single: bool = True
    regress_forces: bool = True
    otf_graph: bool = True
    max_num_neighbors: int = 20
    cutoff: float = 8.0
    max_num_elements: int = 90
    num_interactions: int = 8
    lmax: int = 6
    mmax: int = 1
    num_resolutions: int = 2
    sphere_channels: int = 128
    sphere_channels_reduce: int = 128
    hidden_channels: int = 256
    num_taps: int = -1
    use_grid: bool = True
    num_bands: int = 1
    num_sphere_samples: int = 128
    num_basis_functions: int = 128
    distance_function: DistanceFunction = "gaussian"
    basis_width_scalar: float = 1.0
    distance_resolution: float = 0.02
    show_timing_info: bool = False
    direct_forces: bool = True
    roll: Roll = "random"
    eval_roll: Roll | None = "fixed"
    edge_rotation: bool = True
    sphere_weighting: SphereWeighting = "fairchem"
    neighbor_ties: NeighborTies = "official"
    smooth: bool = False
    resolution_distance: float = 3.0
    resolution_band: float = 0.5
    envelope_exponent: int = 5
    zbl: bool = False
    zbl_radius_scale: float = 0.6

    LABEL: typing.ClassVar[str] = "SCN"
    OFFICIAL_NAMES: typing.ClassVar[tuple[str, ...]] = ("scn", "spherical_channel_network")

    def _check_ranges(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ConfigError(what)

        need(1 <= self.lmax <= 10, f"lmax must be in 1..10, got {self.lmax}")
        need(0 <= self.mmax <= self.lmax, f"mmax must be in 0..lmax={self.lmax}, got {self.mmax}")
        need(self.num_resolutions in (1, 2), f"num_resolutions must be 1 or 2, got {self.num_resolutions}")
        need(self.num_bands in (1, 2), f"num_bands must be 1 or 2, got {self.num_bands}")
        need(self.cutoff > 0, f"cutoff must be > 0 Å, got {self.cutoff}")
        need(self.max_num_neighbors >= 1, f"max_num_neighbors must be >= 1, got {self.max_num_neighbors}")
        need(self.max_num_elements >= 2, f"max_num_elements must be >= 2, got {self.max_num_elements}")
        need(self.num_interactions >= 1, f"num_interactions must be >= 1, got {self.num_interactions}")
        need(self.num_taps == -1 or self.num_taps >= 1, f"num_taps must be -1 or >= 1, got {self.num_taps}")
        need(self.distance_resolution > 0, f"distance_resolution must be > 0, got {self.distance_resolution}")
        need(
            int(self.cutoff / self.distance_resolution) >= 1,
            f"cutoff / distance_resolution must give at least one basis function "
            f"({self.cutoff} / {self.distance_resolution})",
        )
        need(self.basis_width_scalar > 0, f"basis_width_scalar must be > 0, got {self.basis_width_scalar}")
        for name in ("sphere_channels", "sphere_channels_reduce", "hidden_channels", "num_sphere_samples", "num_basis_functions"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.envelope_exponent >= 2, f"envelope_exponent must be >= 2, got {self.envelope_exponent}")
        need(0 < self.zbl_radius_scale <= 2, f"zbl_radius_scale must be in (0, 2], got {self.zbl_radius_scale}")
        need(self.resolution_band > 0, f"resolution_band must be > 0 Å, got {self.resolution_band}")
        need(
            not (self.smooth and self.num_resolutions == 2)
            or self.resolution_band / 2 < self.resolution_distance < self.cutoff - self.resolution_band / 2,
            f"resolution_distance ± resolution_band/2 must lie inside (0, cutoff), got "
            f"{self.resolution_distance} ± {self.resolution_band / 2} with cutoff {self.cutoff}",
        )
        if self.num_resolutions == 2:
            need(
                self.hidden_channels >= 4,
                f"hidden_channels must be >= 4 with two resolutions (the second has a quarter), "
                f"got {self.hidden_channels}",
            )

    @property
    def neighbor_cap(self) -> int:
        """The neighbour cap the radius graph uses: ``max_num_neighbors``, or none (a bound no
        structure reaches) for the smooth variant."""
        return UNCAPPED if self.smooth else self.max_num_neighbors


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """``value`` checked against the type ``hint`` (ints are accepted for floats; integral floats
    for ints, as YAML and JSON may give them); ConfigError otherwise."""
    options = get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{name} must not be None")
    errors = []
    for option in options:
        if option is type(None):
            continue
        if typing.get_origin(option) is Literal:
            if value in get_args(option):
                return value
            errors.append(f"one of {list(get_args(option))}")
        elif option is bool:
            if isinstance(value, bool):
                return value
            errors.append("true or false")
        elif option is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            errors.append("an integer")
        elif option is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            errors.append("a number")
    raise ConfigError(f"{name} must be {' or '.join(errors)}, got {value!r}")

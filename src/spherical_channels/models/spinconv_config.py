"""The configuration of a SpinConv: one frozen, validated record per model (as :class:`SCNConfig`).

:class:`SpinConvConfig` holds every constructor argument of the official SpinConv (OCP
``ocpmodels/models/spinconv.py``: same names, same defaults) plus this package's additions. A
model is built from it, exposes it read-only (``model.config``), and checkpoints store
``config.to_dict()``.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal, Union

from .config import ConfigError, ModelConfig

__all__ = ["FORCE_ROTATION_RULES", "RUNTIME_OPTIONS", "SPHERE_MESSAGES", "SpinConvConfig"]

SphereMessage = Literal["fullconv", "rotspharmwd"]
ForceEstimator = Literal["random", "grad"]
ForceRotations = Literal["random", "fixed", "fixed_shared"]
PoleRule = Literal["snap", "official"]
NeighborTies = Literal["official", "shell"]
Readout = Literal["add", "sum", "mean"]

#: The sphere representations the official ``SpinConvBlock`` implements (its constructor also
#: names "spharm" and "rotspharmroll" in an lmax check, but then refuses them).
SPHERE_MESSAGES = typing.get_args(SphereMessage)
#: How the force-centric output block orients its per-atom frames (``force_rotations``).
FORCE_ROTATION_RULES = typing.get_args(ForceRotations)

#: Options that change how a model is evaluated but not its parameters; a built model may change
#: them with ``model.update_config(...)``.
RUNTIME_OPTIONS = frozenset({"force_rotations", "eval_force_rotations", "show_timing_info"})


@dataclass(frozen=True)
class SpinConvConfig(ModelConfig):
    """Every option of a SpinConv (official names and defaults first, then this package's).

    Official options (OCP ``spinconv``): ``use_pbc``, ``regress_forces``, ``otf_graph``,
    ``hidden_channels`` (edge message width), ``mid_hidden_channels`` (width inside the
    blocks), ``num_interactions`` (message blocks), ``num_basis_functions`` (distance
    Gaussians), ``basis_width_scalar``, ``max_num_neighbors``, ``sphere_size_lat``,
    ``sphere_size_long`` (the latitude x longitude grid each edge's neighbours are splatted
    on), ``cutoff`` (Å), ``distance_block_scalar_max`` (the per-element-pair distance scale
    lies in [1/max, max]), ``max_num_elements``, ``embedding_size`` (element embeddings),
    ``show_timing_info``, ``sphere_message`` / ``output_message`` (``"fullconv"``: a
    circular convolution over longitude, then its mean; ``"rotspharmwd"``: spherical
    harmonics of degree <= ``lmax`` summed over the grid's rolls), ``lmax`` (``False`` unless
    a harmonic representation is used), ``force_estimator`` (``"grad"``: energy-centric,
    forces from the energy's gradient; ``"random"``: force-centric, a force block on
    ``num_rand_rotations`` per-atom frames), ``model_ref_number``, ``readout``,
    ``num_rand_rotations``, ``scale_distances`` (learned per element pair distance scale
    and offset). ``otf_graph``, ``show_timing_info``, ``model_ref_number`` and ``readout``
    are kept for compatibility: the official code ignores the last two (the energy is always
    the sum over atoms) and the graph is always built by the model. ``use_pbc=False`` treats
    every structure as a molecule (cells ignored).

    Additions:
        exact_gradient: with ``force_estimator="grad"``: ``True``: forces are ``-dE/dx`` of
            the predicted energy (energy-conserving; stress available). ``False`` (the
            official behaviour, for official checkpoints): the official code builds the
            sphere splat weights without gradient, so its forces are the gradient through the
            edge lengths only and not ``-dE/dx`` (the model is then not ``conservative``).
            No effect on force-centric models. New models get ``True``.
        force_rotations: frames of the force-centric block in training mode: ``"random"``
            (the official code: fresh random rotations for every atom on every call),
            ``"fixed"`` (the fixtures' deterministic sequence, one rotation per atom and frame:
            rotation r of atom n of a structure of N atoms is element r N + n of the sequence)
            or ``"fixed_shared"`` (the sequence's first ``num_rand_rotations`` rotations for
            every atom: the forces then follow the atoms under any reordering).
        eval_force_rotations: the same in eval mode (deterministic inference by default);
            ``None`` means ``force_rotations``.
        pole_rule: neighbours that fall on a pole of a sphere (an edge's own reverse edge, a
            periodic self-image) have no defined longitude: ``"snap"`` puts every direction
            within ``pole_tolerance`` of a pole exactly on it (the fixtures' rule,
            deterministic); ``"official"`` keeps the longitude of the rounding noise.
        pole_tolerance: distance from the pole axis (on the unit sphere) below which
            ``"snap"`` applies.
        neighbor_ties: how distances tied at the neighbour cap are broken: ``"official"``
            (the K nearest; exact ties broken by the edge vector) or ``"shell"`` (a shell the
            cap would cut is kept whole); see :mod:`spherical_channels.data.neighbors`.
    """

    use_pbc: bool = True
    regress_forces: bool = True
    otf_graph: bool = False
    hidden_channels: int = 32
    mid_hidden_channels: int = 200
    num_interactions: int = 1
    num_basis_functions: int = 200
    basis_width_scalar: float = 1.0
    max_num_neighbors: int = 20
    sphere_size_lat: int = 15
    sphere_size_long: int = 9
    cutoff: float = 10.0
    distance_block_scalar_max: float = 2.0
    max_num_elements: int = 90
    embedding_size: int = 32
    show_timing_info: bool = False
    sphere_message: SphereMessage = "fullconv"
    output_message: SphereMessage = "fullconv"
    lmax: Union[bool, int] = False
    force_estimator: ForceEstimator = "random"
    model_ref_number: int = 0
    readout: Readout = "add"
    num_rand_rotations: int = 5
    scale_distances: bool = True
    exact_gradient: bool = False
    force_rotations: ForceRotations = "random"
    eval_force_rotations: Union[ForceRotations, None] = "fixed"
    pole_rule: PoleRule = "snap"
    pole_tolerance: float = 1e-5
    neighbor_ties: NeighborTies = "official"

    # official options it does not name keep their defaults in from_official
    # (exact_gradient=False: the official behaviour)
    LABEL: typing.ClassVar[str] = "SpinConv"
    OFFICIAL_NAMES: typing.ClassVar[tuple[str, ...]] = ("spinconv",)

    def _check_ranges(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ConfigError(what)

        need(self.cutoff > 0, f"cutoff must be > 0 Å, got {self.cutoff}")
        need(self.max_num_neighbors >= 1, f"max_num_neighbors must be >= 1, got {self.max_num_neighbors}")
        need(self.max_num_elements >= 2, f"max_num_elements must be >= 2, got {self.max_num_elements}")
        need(self.num_interactions >= 1, f"num_interactions must be >= 1, got {self.num_interactions}")
        # the Gaussians' spacing sets their width: it needs two of them
        need(self.num_basis_functions >= 2, f"num_basis_functions must be >= 2, got {self.num_basis_functions}")
        need(self.basis_width_scalar > 0, f"basis_width_scalar must be > 0, got {self.basis_width_scalar}")
        need(self.distance_block_scalar_max > 0, f"distance_block_scalar_max must be > 0, got {self.distance_block_scalar_max}")
        for name in ("mid_hidden_channels", "embedding_size", "num_rand_rotations", "sphere_size_long"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        # latitudes are not circular: the splat needs two rows to interpolate between
        need(self.sphere_size_lat >= 2, f"sphere_size_lat must be >= 2, got {self.sphere_size_lat}")
        # the official blocks use hidden_channels // 8 groups (convolution and GroupNorm)
        groups = self.hidden_channels // 8
        need(groups >= 1, f"hidden_channels must be >= 8 (the blocks use hidden_channels // 8 groups), got {self.hidden_channels}")
        need(
            self.mid_hidden_channels % groups == 0,
            f"mid_hidden_channels ({self.mid_hidden_channels}) must be divisible by hidden_channels // 8 = {groups} "
            f"(the groups of the spin convolution and its GroupNorm)",
        )
        messages = [self.sphere_message] + ([self.output_message] if self.force_estimator == "random" else [])
        if "fullconv" in messages:
            need(
                self.hidden_channels * self.sphere_size_lat % groups == 0,
                f"hidden_channels * sphere_size_lat ({self.hidden_channels * self.sphere_size_lat}) must be divisible "
                f"by hidden_channels // 8 = {groups} (the groups of the spin convolution)",
            )
        if "rotspharmwd" in messages:
            need(
                not isinstance(self.lmax, bool) and self.lmax >= 0,
                f"lmax must be a degree >= 0 for the spherical-harmonic message 'rotspharmwd', got {self.lmax!r}",
            )
            need(self.sphere_size_lat % 2 == 0, f"sphere_size_lat must be even for 'rotspharmwd', got {self.sphere_size_lat}")
            need(
                self.lmax + 1 <= self.sphere_size_lat // 2,
                f"lmax + 1 ({self.lmax + 1}) must be <= sphere_size_lat // 2 ({self.sphere_size_lat // 2}) for 'rotspharmwd'",
            )
        elif not isinstance(self.lmax, bool):
            need(self.lmax >= 0, f"lmax must be False or a degree >= 0, got {self.lmax}")
        need(0 < self.pole_tolerance < 0.1, f"pole_tolerance must be in (0, 0.1), got {self.pole_tolerance}")
        need(
            not (self.exact_gradient and self.force_estimator == "grad" and self.pole_rule == "official"),
            "exact_gradient needs pole_rule='snap': with the official rule the longitude of a point on a pole "
            "is rounding noise, and so would be its gradient",
        )

    # ------------------------------------------------------------------ derived
    @property
    def energy_centric(self) -> bool:
        """Forces from the energy's gradient (``force_estimator="grad"``)."""
        return self.force_estimator == "grad"

    @property
    def conservative(self) -> bool:
        """Whether the forces are ``-dE/dx`` of the energy (so stress exists too)."""
        return self.regress_forces and self.energy_centric and self.exact_gradient

    @property
    def neighbor_cap(self) -> int:
        """The neighbour cap the radius graph uses."""
        return self.max_num_neighbors

"""The configuration of a SchNet: one frozen, validated record per model (as :class:`SCNConfig`).

:class:`SchNetConfig` holds every constructor argument of the official OC20 SchNet (fairchem's
``SchNetWrap``: same names, same defaults) plus this package's additions. A model is built from
it, exposes it read-only (``model.config``), and checkpoints store ``config.to_dict()``.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

from .config import ConfigError, ModelConfig

__all__ = ["OFFICIAL_MAX_NEIGHBORS", "SCHNET_NUM_ELEMENTS", "SchNetConfig"]

Readout = Literal["add", "sum", "mean"]
NeighborTies = Literal["official", "shell"]

#: The neighbour cap of the official SchNet: ``SchNetWrap`` sets ``self.max_neighbors = 50``
#: in its constructor (not an argument), so every official checkpoint uses it.
OFFICIAL_MAX_NEIGHBORS = 50
#: Rows of the official element embedding (torch_geometric's SchNet: ``Embedding(100, ...)``):
#: atomic numbers 1..99.
SCHNET_NUM_ELEMENTS = 100


@dataclass(frozen=True)
class SchNetConfig(ModelConfig):
    """Every option of a SchNet (official names and defaults first, then this package's).

    Official options (fairchem ``SchNetWrap``): ``use_pbc``, ``use_pbc_single``,
    ``regress_forces``, ``otf_graph``, ``hidden_channels`` (atom features), ``num_filters``
    (width of the continuous filters), ``num_interactions``, ``num_gaussians`` (distance
    expansion), ``cutoff`` (Å), ``readout`` (``"add"``/``"sum"``: energy = sum of atomic
    energies; ``"mean"``: their mean). ``use_pbc_single`` and ``otf_graph`` are kept for
    compatibility (the graph is always built by the model, one structure like another).
    ``use_pbc=False`` treats every structure as a molecule (cells ignored), as the official
    code does; its non-periodic graph (torch_geometric's ``radius_graph``, at most 32
    neighbours chosen by the search) is not reproduced: here it is the same nearest-neighbour
    graph as with periodicity.

    Additions:
        max_num_neighbors: the neighbour cap per atom: the official code hard-codes 50.
        neighbor_ties: how distances tied at the cap are broken: ``"official"`` (the K
            nearest; exact ties broken by the edge vector) or ``"shell"`` (a shell the cap
            would cut is kept whole); see :mod:`spherical_channels.data.neighbors`.
    """

    use_pbc: bool = True
    use_pbc_single: bool = False
    regress_forces: bool = True
    otf_graph: bool = False
    hidden_channels: int = 128
    num_filters: int = 128
    num_interactions: int = 6
    num_gaussians: int = 50
    cutoff: float = 10.0
    readout: Readout = "add"
    max_num_neighbors: int = OFFICIAL_MAX_NEIGHBORS
    neighbor_ties: NeighborTies = "official"

    LABEL: typing.ClassVar[str] = "SchNet"
    OFFICIAL_NAMES: typing.ClassVar[tuple[str, ...]] = ("schnet",)

    def _check_ranges(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ConfigError(what)

        need(self.cutoff > 0, f"cutoff must be > 0 Å, got {self.cutoff}")
        # the official readout halves the features before the last layer
        need(self.hidden_channels >= 2, f"hidden_channels must be >= 2, got {self.hidden_channels}")
        need(self.num_filters >= 1, f"num_filters must be >= 1, got {self.num_filters}")
        need(self.num_interactions >= 1, f"num_interactions must be >= 1, got {self.num_interactions}")
        # the Gaussians' width is the spacing of their centres: it needs two of them
        need(self.num_gaussians >= 2, f"num_gaussians must be >= 2, got {self.num_gaussians}")
        need(self.max_num_neighbors >= 1, f"max_num_neighbors must be >= 1, got {self.max_num_neighbors}")

    @property
    def max_num_elements(self) -> int:
        """Size of the element table (atomic numbers ``1..max_num_elements - 1``)."""
        return SCHNET_NUM_ELEMENTS

    @property
    def neighbor_cap(self) -> int:
        """The neighbour cap the radius graph uses."""
        return self.max_num_neighbors

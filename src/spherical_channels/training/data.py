"""Training data: data sets opened for training, and the collate that builds each batch and its
neighbour graph in the DataLoader workers (so the main process only steps the model).

A structure that cannot be read or batched does not raise in the worker (where the error would
reach the main process wrapped in a worker traceback): the batch carries the error's message,
naming the file and the structure's index in the data set, and the trainer raises it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from ..data.batch import AtomicBatch
from ..data.neighbors import Graph, build_graph
from ..data.validation import StructureError, atoms_problem
from .config import DataSource

__all__ = ["GraphCollate", "IndexedDataset", "TrainingBatch", "collate", "locate_in_data_set", "open_training_data"]


def open_training_data(source: DataSource, max_atomic_number: int, trust_pickle: bool = False) -> Dataset:
    """A data set with energy and force targets, validated as it is read; ``trust_pickle``
    allows a legacy OC20 LMDB (its records are unpickled, which can run code)."""
    from ..data.datasets import open_dataset

    return open_dataset(
        source.path,
        format=source.format,
        energy_key=source.energy_key,
        forces_key=source.forces_key,
        require_energy=True,
        require_forces=True,
        max_atomic_number=max_atomic_number,
        trust_pickle=trust_pickle,
    )


@dataclass
class TrainingBatch:
    """A batch with what the trainer needs around it.

    Attributes:
        indices: the structures' indices in their data set.
        batch: the structures (None when ``error`` is set).
        graph: their neighbour graph, built with the model's cutoff and neighbour cap.
        error: why the batch could not be built (names the file and structure), or None.
    """

    indices: list[int]
    batch: AtomicBatch | None
    graph: Graph | None
    error: str | None = None

    @property
    def num_structures(self) -> int:
        return len(self.indices)

    def to(self, device: torch.device | str) -> "TrainingBatch":
        if self.batch is None:
            return self
        graph = self.graph.to(device) if self.graph is not None else None
        return TrainingBatch(self.indices, self.batch.to(device), graph, self.error)


@dataclass
class _Failed:
    """A structure that could not be read (the message names the file and index)."""

    message: str


class IndexedDataset(Dataset):
    """Items are ``(index, atoms)``, so that a batch knows which structures it holds; a
    structure whose reading fails becomes ``(index, failure)`` (see the module docstring)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        try:
            return index, self.dataset[index]
        except ValueError as err:  # DataError: the reader's message names file and index
            return index, _Failed(str(err))


class GraphCollate:
    """Picklable collate (DataLoader workers): ``[(index, atoms)]`` -> :class:`TrainingBatch`
    with the batch in ``dtype`` and its radius graph (``cutoff``, ``max_num_neighbors``: the
    model's). ``source`` (the data set's path) names the structures in error messages."""

    def __init__(
        self,
        dtype: torch.dtype,
        cutoff: float,
        max_num_neighbors: int,
        source: str | None = None,
        ties: str = "official",
    ) -> None:
        self.dtype = dtype
        self.cutoff = float(cutoff)
        self.max_num_neighbors = int(max_num_neighbors)
        self.source = source
        self.ties = ties  # the model's neighbor_ties: the graph must be the one the model builds

    def __call__(self, items: Sequence[tuple[int, Any]]) -> TrainingBatch:
        indices = [int(i) for i, _ in items]
        for _, atoms in items:
            if isinstance(atoms, _Failed):
                return TrainingBatch(indices, None, None, atoms.message)
        structures = [a for _, a in items]
        try:
            batch = AtomicBatch.from_atoms(structures, dtype=self.dtype)
            graph = build_graph(batch, self.cutoff, self.max_num_neighbors, ties=self.ties)
        except ValueError:
            return TrainingBatch(indices, None, None, self._culprit(indices, structures))
        return TrainingBatch(indices, batch, graph)

    def _culprit(self, indices: list[int], structures: list[Any]) -> str:
        """The message of the first structure that fails alone (errors of a batch name the
        structure by its place in the batch, not in the data set)."""
        where = f"{self.source}: " if self.source else ""
        for index, atoms in zip(indices, structures):
            # the rules on the file's float64 values first: they say "not finite in float32"
            # where the float32 batch would only see an inf
            problem = atoms_problem(atoms, check_overlaps=False, max_abs_force=None, max_abs_energy_per_atom=None)
            if problem is not None:
                return f"{where}structure {index}: {problem}"
            try:
                build_graph(AtomicBatch.from_atoms([atoms], dtype=self.dtype), self.cutoff, self.max_num_neighbors)
            except ValueError as err:
                return f"{where}structure {index}: {_without_batch_position(err)}"
        return f"{self.source or 'training data'}: structures {indices} could not be batched together"


def locate_in_data_set(err: StructureError, indices: Sequence[int], source: str | None) -> str:
    """The message of an error about structure ``err.index`` of a batch, naming that structure
    by its index in the data set (``indices[err.index]``) and the data set's file."""
    position = err.index
    text = str(err)
    prefix = f"structure {position}: "
    where = f"{source}: " if source else ""
    if position is None or not 0 <= position < len(indices):
        return f"{where}batch of structures {list(indices)}: {text}"
    return f"{where}structure {indices[position]}: {text[len(prefix):] if text.startswith(prefix) else text}"


def _without_batch_position(err: ValueError) -> str:
    """The message of an error about a one-structure batch, its "structure 0" left out."""
    text = str(err)
    if isinstance(err, StructureError) and text.startswith("structure 0: "):
        return text[len("structure 0: "):]
    return text.replace(" of structure 0", "").replace("structure 0: ", "")


def collate(
    items: Sequence[tuple[int, Any]],
    dtype: torch.dtype = torch.float32,
    cutoff: float = 8.0,
    max_num_neighbors: int = 20,
) -> TrainingBatch:
    """``[(index, atoms)]`` -> :class:`TrainingBatch` (see :class:`GraphCollate`)."""
    return GraphCollate(dtype, cutoff, max_num_neighbors)(items)

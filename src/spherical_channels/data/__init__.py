"""Atomic batches, the SCN radius graph, and datasets of structures (readers, writers,
validation, statistics)."""

from .batch import AtomicBatch
from .validation import MIN_DISTANCE, StructureError, validate_atoms, validate_batch
from .datasets import (
    DataError,
    StructureDataset,
    UnknownFormatError,
    open_dataset,
    validate_dataset,
    write_dataset,
)
from .neighbors import Graph, build_graph, edge_vectors, neighbor_ranks
from .statistics import DatasetStatistics, compute_statistics

__all__ = [
    "AtomicBatch",
    "DataError",
    "DatasetStatistics",
    "Graph",
    "MIN_DISTANCE",
    "StructureDataset",
    "StructureError",
    "UnknownFormatError",
    "build_graph",
    "compute_statistics",
    "edge_vectors",
    "neighbor_ranks",
    "open_dataset",
    "validate_atoms",
    "validate_batch",
    "validate_dataset",
    "write_dataset",
]

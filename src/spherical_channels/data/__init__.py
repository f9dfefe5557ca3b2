"""Atomic batches and the SCN radius graph."""

from .batch import AtomicBatch
from .neighbors import Graph, build_graph, edge_vectors, neighbor_ranks

__all__ = ["AtomicBatch", "Graph", "build_graph", "edge_vectors", "neighbor_ranks"]

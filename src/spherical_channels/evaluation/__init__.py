"""Evaluation: OC20 metrics and running a model over data sets."""

from .metrics import (
    S2EFMetrics,
    average_distance_within_threshold,
    average_force_below_threshold,
    minimum_image_distances,
    relaxed_energy_metrics,
)

__all__ = [
    "S2EFMetrics",
    "average_distance_within_threshold",
    "average_force_below_threshold",
    "minimum_image_distances",
    "relaxed_energy_metrics",
]

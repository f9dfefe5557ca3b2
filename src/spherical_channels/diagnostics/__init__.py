"""Diagnostics of a trained or random model: equivariance measurements (paper Appendix A)."""

from .equivariance import rotate_batch, rotation_mad

__all__ = ["rotate_batch", "rotation_mad"]

"""Models: the Spherical Channel Network and its building blocks."""

from .scn import SCN

__all__ = ["SCN"]

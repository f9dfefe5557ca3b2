"""Models: the Spherical Channel Network and its building blocks, and the SchNet baseline
(every model by name: :mod:`.registry`)."""

from .schnet import SchNet
from .scn import SCN

__all__ = ["SCN", "SchNet"]

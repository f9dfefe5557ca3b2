"""Models: the Spherical Channel Network and its building blocks, and the seeds' baselines SchNet
and SpinConv (every model by name: :mod:`.registry`)."""

from .schnet import SchNet
from .scn import SCN
from .spinconv import SpinConv

__all__ = ["SCN", "SchNet", "SpinConv"]

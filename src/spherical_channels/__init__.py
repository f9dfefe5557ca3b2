"""spherical_channels: Spherical Channel Networks (Zitnick et al., NeurIPS 2022) for atomistic modelling."""

__version__ = "0.1.0"

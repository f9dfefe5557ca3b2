"""spherical_channels: Spherical Channel Networks (Zitnick et al., NeurIPS 2022) for atomistic modelling.

``SCNCalculator`` (an ASE calculator), ``SCN`` (the model) and ``load_model`` are imported
lazily, so that ``import spherical_channels`` and ``scn --help`` stay fast.
"""

__version__ = "0.1.0"

__all__ = ["SCN", "SCNCalculator", "load_model", "__version__"]


def __getattr__(name: str):  # noqa: ANN202 - PEP 562 lazy attributes
    if name == "SCNCalculator":
        from .simulation.calculator import SCNCalculator

        return SCNCalculator
    if name == "SCN":
        from .models.scn import SCN

        return SCN
    if name == "load_model":
        from .models.checkpoint import load_model

        return load_model
    raise AttributeError(f"module 'spherical_channels' has no attribute {name!r}")

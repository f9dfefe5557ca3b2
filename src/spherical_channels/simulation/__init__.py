"""Using a model: the ASE calculator, relaxations."""

from .calculator import SCNCalculator
from .relax import OPTIMIZERS, RelaxResult, max_free_force, relax

__all__ = ["OPTIMIZERS", "RelaxResult", "SCNCalculator", "max_free_force", "relax"]

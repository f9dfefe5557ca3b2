"""Using a model: the ASE calculator, relaxations (one at a time with ASE, or batched), MD."""

from .calculator import SCNCalculator
from .engine import RelaxOutcome, relax_many
from .md import DirectForcesWarning, MDError, MDResult, block_average, md_many, read_md_log, run_md
from .relax import OPTIMIZERS, RelaxResult, max_free_force, relax

__all__ = [
    "OPTIMIZERS",
    "DirectForcesWarning",
    "MDError",
    "MDResult",
    "RelaxOutcome",
    "RelaxResult",
    "SCNCalculator",
    "block_average",
    "max_free_force",
    "md_many",
    "read_md_log",
    "relax",
    "relax_many",
    "run_md",
]

"""Diagnostics of a trained or random model: equivariance measurements (paper Appendix A).

Table 4 (the whole model, :mod:`.equivariance`), Table 5 (the message aggregation,
:mod:`.aggregation`), Table 6 (the output blocks, :mod:`.output_heads`), and all three as one
report (:mod:`.report`, the ``scn diagnose`` command).
"""

from .aggregation import aggregation_differences, capture_aggregation_inputs
from .equivariance import AbsDifference, NonFiniteOutput, random_rotations, rotate_batch, rotation_differences, rotation_mad
from .output_heads import final_features, head_outputs, output_head_differences
from .report import diagnose, format_report, plot_report

__all__ = [
    "AbsDifference",
    "NonFiniteOutput",
    "aggregation_differences",
    "capture_aggregation_inputs",
    "diagnose",
    "final_features",
    "format_report",
    "head_outputs",
    "output_head_differences",
    "plot_report",
    "random_rotations",
    "rotate_batch",
    "rotation_differences",
    "rotation_mad",
]

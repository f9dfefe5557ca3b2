"""Deployable inference artefacts: export a model to one ``.pt2`` file and run it without its
Python model, or compile it for inference.

* :func:`export_model` (``scn export``): the model's energy and forces (``-dE/dx`` inside the
  program for energy-conserving models) as a program of tensors, exported with dynamic atom,
  structure and edge counts, as an AOTInductor package or an ``ExportedProgram``;
* :func:`load_exported`: the file as an :class:`ExportedModel`, which ``SCNCalculator`` and
  ``relax_many`` take like a model (the graph is built in Python, as for the model);
* :func:`compile_model`: the same program under ``torch.compile``, in memory.
"""

from .compiled import compile_model
from .export import ExportReport, export_model
from .loaded import ExportedModel, load_exported
from .metadata import FORMATS, ArtefactInfo, is_exported_model, read_info
from .programs import ExportError

__all__ = [
    "FORMATS",
    "ArtefactInfo",
    "ExportError",
    "ExportReport",
    "ExportedModel",
    "compile_model",
    "export_model",
    "is_exported_model",
    "load_exported",
    "read_info",
]

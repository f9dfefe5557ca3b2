"""Exporting a model to a deployable file: the program, traced, exported, compiled and checked.

``export_model(model, "model.pt2")``:

1. copies the model (eval mode, frozen weights, the requested dtype and device);
2. builds the program's inputs for two example structures (:func:`~.inputs.flat_inputs`) and
   traces the program (:mod:`.tracing`): energy, and ``-dE/dx`` through autograd for an
   energy-conserving model, as one graph with symbolic sizes;
3. exports it (``torch.export.export``) with dynamic atom, structure and edge counts;
4. writes it: ``format="aoti"`` compiles it with AOTInductor into a package holding a shared
   library (fastest to run; minutes to compile); ``"exported-program"`` saves the
   ``ExportedProgram`` (seconds; runs the ATen graph from Python);
5. loads the file back and compares it with the eager model on every example structure (other
   atom and edge counts than the traced ones): a mismatch removes the file and raises.

The file is written under a temporary name and renamed when it has passed: an interrupted or
failed export leaves no artefact behind.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..data.batch import AtomicBatch
from .inputs import flat_inputs, input_names
from .loaded import ExportedModel, load_program
from .metadata import FORMATS, METADATA_KEY, ArtefactInfo
from .programs import ExportError, program_spec
from .tracing import dynamic_shapes, trace

if TYPE_CHECKING:
    import ase

__all__ = ["ExportReport", "default_examples", "export_model", "prepare_model", "traced_program"]

#: Agreement required of the artefact with the eager model, relative to max(1, |value|): float32
#: programs may round differently once compiled (fused kernels, other summation orders).
VERIFY_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}


@dataclass
class ExportReport:
    """What :func:`export_model` did.

    Attributes:
        path: the artefact.
        info: its metadata.
        seconds: wall time per stage (``trace``, ``export``, ``write``, ``verify``).
        energy_error, force_error: largest |artefact - eager| over the check structures (eV,
            eV/Å; force error 0 without forces).
        num_checked: structures compared.
    """

    path: Path
    info: ArtefactInfo
    seconds: dict[str, float]
    energy_error: float
    force_error: float
    num_checked: int


def default_examples() -> list["ase.Atoms"]:
    """The package's example structures (eight OC20-like slabs and molecules in boxes)."""
    from ase.io import read

    from ..resources import EXAMPLE_STRUCTURES, resource_path

    return read(resource_path(EXAMPLE_STRUCTURES), ":")


def prepare_model(
    model: nn.Module, dtype: torch.dtype | None, device: torch.device | str | None
) -> tuple[nn.Module, torch.dtype, torch.device]:
    """``(copy, dtype, device)``: a copy of ``model`` in eval mode with frozen weights, in
    ``dtype`` on ``device`` (default: the model's own)."""
    first = next((t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()), None)
    dtype = dtype or (first.dtype if first is not None else torch.float32)
    device = torch.device(device) if device is not None else (first.device if first is not None else torch.device("cpu"))
    if dtype not in VERIFY_TOLERANCE:
        raise ExportError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    prepared = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    prepared.requires_grad_(False)
    return prepared, dtype, device


@dataclass
class TracedProgram:
    """A model's program traced at example inputs (see :func:`traced_program`)."""

    graph: torch.fx.GraphModule
    inputs: tuple[torch.Tensor, ...]
    info: ArtefactInfo
    model: nn.Module
    check_batch: AtomicBatch


def traced_program(
    model: nn.Module,
    *,
    format: str = "exported-program",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    example: Sequence["ase.Atoms"] | None = None,
    source: str | None = None,
    weights: str | None = None,
) -> TracedProgram:
    """Steps 1-2 of the module docstring: the prepared model, its traced program, the inputs
    it was traced at and the metadata an artefact of it carries.

    ``example``: structures to trace and check with (default :func:`default_examples`); the
    first two are traced (their counts must be >= 2 atoms and >= 2 edges in every edge group,
    so that no count is mistaken for a constant), all of them checked.
    """
    from .. import __version__

    spec = program_spec(model)
    prepared, dtype, device = prepare_model(model, dtype, device)
    options = spec.graph_options(prepared)
    structures = list(default_examples() if example is None else example)
    if not structures:
        raise ExportError("no example structures to trace the model with")
    traced = structures[:2] if len(structures) >= 2 else [structures[0], structures[0].copy()]
    trace_batch = AtomicBatch.from_atoms(traced, dtype=dtype, device=device)
    inputs = flat_inputs(trace_batch, options)
    _check_example_sizes(inputs, options.num_groups)
    # One eager call first: Python-side caches the model fills on first use (SchNet's Gaussian
    # width) would otherwise be filled while tracing, with tracing's values.
    prepared(trace_batch)
    program = spec.program(prepared)
    outputs = ["energy", "forces"] if prepared.regress_forces else ["energy"]
    info = ArtefactInfo(
        format=format,
        model_name=spec.name,
        model_config=prepared.config.to_dict(),
        graph=options,
        conservative=bool(prepared.conservative),
        regress_forces=bool(prepared.regress_forces),
        dtype=str(dtype).removeprefix("torch."),
        device=str(device),
        max_atomic_number=spec.max_atomic_number(prepared),
        inputs=input_names(options.num_groups),
        outputs=outputs,
        package_version=__version__,
        torch_version=torch.__version__,
        source=source,
        weights=weights,
    )
    graph = trace(program, inputs)
    check_batch = AtomicBatch.from_atoms(structures, dtype=dtype, device=device)
    return TracedProgram(graph, inputs, info, prepared, check_batch)


def _check_example_sizes(inputs: tuple[torch.Tensor, ...], num_groups: int) -> None:
    counts = {"atoms": inputs[0].shape[0]}
    for g in range(num_groups):
        counts[f"edges of group {g}"] = inputs[4 + 2 * g].shape[1]
    small = {k: v for k, v in counts.items() if v < 2}
    if small:
        raise ExportError(
            f"the example structures give too few {', '.join(f'{k} ({v})' for k, v in small.items())} to trace "
            "with dynamic sizes (at least 2 each; a count of 0 or 1 would be taken for a constant): pass "
            "denser example structures (example=...)"
        )


def export_model(
    model: nn.Module,
    path: str | Path,
    *,
    format: str = "aoti",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    example: Sequence["ase.Atoms"] | None = None,
    source: str | None = None,
    weights: str | None = None,
    inductor_configs: dict[str, Any] | None = None,
    verify: bool = True,
) -> ExportReport:
    """Export ``model`` (an SCN or SchNet) to the ``.pt2`` file ``path`` (module docstring).

    Args:
        model: the model (not modified: a copy is exported).
        path: the artefact to write (must end in ``.pt2``; replaced if it exists).
        format: ``"aoti"`` (AOTInductor package) or ``"exported-program"``.
        dtype, device: the program's precision and device (default: the model's).
        example: structures to trace and check with (see :func:`traced_program`).
        source, weights: recorded in the metadata (the checkpoint and which weights).
        inductor_configs: extra AOTInductor options (``format="aoti"``).
        verify: load the file back and compare it with the model (step 5); without it the
            errors are reported as NaN.

    Returns:
        an :class:`ExportReport`. Load the file with :func:`~.loaded.load_exported`.

    Raises:
        ExportError: a model that cannot be exported (the message says why), example
            structures too small to trace with, or an artefact that disagrees with the model.
    """
    if format not in FORMATS:
        raise ExportError(f"format must be one of {FORMATS}, got {format!r}")
    path = Path(path)
    if path.suffix != ".pt2":
        raise ExportError(f"{path}: an exported model is a PT2 archive: name it *.pt2")
    if path.is_dir():
        raise ExportError(f"{path}: is a directory")
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    traced = traced_program(model, format=format, dtype=dtype, device=device, example=example, source=source, weights=weights)
    seconds["trace"] = time.perf_counter() - start

    start = time.perf_counter()
    try:
        exported = torch.export.export(
            traced.graph, traced.inputs, dynamic_shapes=dynamic_shapes(traced.info.graph.num_groups)
        )
    except Exception as err:  # noqa: BLE001 - e.g. a count the model's code turned into a constant
        lines = [line for line in str(err).strip().splitlines() if line.strip()]
        raise ExportError(f"torch.export failed: {type(err).__name__}: {' '.join(lines[:3])[:600]}") from err
    seconds["export"] = time.perf_counter() - start

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp.pt2", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        start = time.perf_counter()
        _write(exported, tmp, traced.info, inductor_configs)
        seconds["write"] = time.perf_counter() - start
        energy_error = force_error = float("nan")
        if verify:
            start = time.perf_counter()
            energy_error, force_error = _verify(tmp, traced)
            seconds["verify"] = time.perf_counter() - start
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ExportReport(path, traced.info, seconds, energy_error, force_error, traced.check_batch.num_structures)


def _write(exported: torch.export.ExportedProgram, path: Path, info: ArtefactInfo, inductor_configs: dict | None) -> None:
    if info.format == "exported-program":
        torch.export.save(exported, str(path), extra_files={f"{METADATA_KEY}.json": info.to_json()})
        return
    configs = dict(inductor_configs or {})
    configs["aot_inductor.metadata"] = {**configs.get("aot_inductor.metadata", {}), METADATA_KEY: info.to_json()}
    path.unlink(missing_ok=True)  # AOTInductor writes the package itself
    torch._inductor.aoti_compile_and_package(exported, package_path=str(path), inductor_configs=configs)


def _verify(path: Path, traced: TracedProgram) -> tuple[float, float]:
    """Largest energy and force differences of the file's program from the eager model on the
    check structures; :class:`ExportError` beyond :data:`VERIFY_TOLERANCE`."""
    loaded = ExportedModel(load_program(path, traced.info), traced.info, path)
    batch = traced.check_batch
    got = loaded(batch)
    want = traced.model(batch)
    tolerance = VERIFY_TOLERANCE[batch.positions.dtype]
    errors = []
    for key in traced.info.outputs:
        reference = want[key].detach()
        difference = float((got[key] - reference).abs().max()) if reference.numel() else 0.0
        scale = max(1.0, float(reference.abs().max()) if reference.numel() else 0.0)
        if not difference <= tolerance * scale:  # also catches NaN
            raise ExportError(
                f"the exported program disagrees with the model on the example structures: max |{key} difference| "
                f"= {difference:.3g} (allowed {tolerance * scale:.3g})"
            )
        errors.append(difference)
    return errors[0], errors[1] if len(errors) > 1 else 0.0

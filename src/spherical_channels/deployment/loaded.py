"""Loading an exported model: an ``nn.Module`` with the models' interface around the program.

:class:`ExportedModel` builds the graph in Python (:func:`~.inputs.flat_inputs`, with the
options stored in the file) and runs the exported program on it; nothing of the original
model's Python code or configuration is rebuilt. It has the interface the calculator, the
relaxation engine and the other callers use: ``model(batch) -> {"energy": [S], "forces":
[N, 3]}``, ``conservative``, ``regress_forces``, and a buffer of the program's dtype on its
device (so that dtype/device detection by parameters and buffers works).

An artefact is compiled for one dtype and device: moving it (``.to``, ``.double()``,
``.cuda()``) to another raises, saying what it was made for.

Loading runs code from the file: an exported program unpickles its tensors and an AOTInductor
package is a compiled shared library. As for pickled checkpoints, this needs the package's one
opt-in, ``trust_pickle=True``, and warns.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..data.batch import AtomicBatch
from ..data.neighbors import Graph
from ..data.validation import validate_batch
from ..models.response import NoStressError
from ..security import OPT_IN_HINT, UntrustedPickleWarning
from .inputs import flat_inputs
from .metadata import ArtefactInfo, read_info
from .programs import ExportError

__all__ = ["ExportedModel", "load_exported"]


class ExportedModel(nn.Module):
    """An exported (or compiled) model: energies and forces from a tensor program.

    Args:
        program: ``program(*flat_inputs) -> (energy [S], forces [N, 3])`` (or ``(energy,)``).
        info: the artefact's metadata.
        path: the file it came from (for messages), if any.

    ``forward(batch, graph=None, stress=False)`` returns ``{"energy": [S], "forces": [N, 3]}``
    (forces only if ``regress_forces``), detached. ``batch`` must be in the program's dtype and
    on its device. There is no stress (``stress=True`` raises ``NoStressError``).
    """

    def __init__(self, program: Callable[..., tuple[torch.Tensor, ...]], info: ArtefactInfo, path: Path | None = None) -> None:
        super().__init__()
        # kept out of the module tree: an exported program's module refuses train()/eval(), and
        # its weights are the program's own (nothing here moves or trains them)
        self.__dict__["program"] = program
        self.info = info
        self.path = path
        # dtype and device of the program, found by parameter/buffer-based detection
        self.register_buffer("dtype_marker", torch.zeros((), dtype=info.torch_dtype, device=info.device), persistent=False)

    @property
    def conservative(self) -> bool:
        """Whether the forces are ``-dE/dx``."""
        return self.info.conservative

    @property
    def regress_forces(self) -> bool:
        """Whether the model predicts forces."""
        return self.info.regress_forces

    @property
    def has_stress(self) -> bool:
        """An exported model computes no stress (``forward(stress=True)`` raises)."""
        return False

    @property
    def dtype(self) -> torch.dtype:
        """The program's floating-point dtype."""
        return self.dtype_marker.dtype

    @property
    def device(self) -> torch.device:
        """The program's device."""
        return self.dtype_marker.device

    def _where(self) -> str:
        return f"{self.path}" if self.path is not None else f"this {self.info.format} model"

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - torch's private signature
        moved = fn(self.dtype_marker)
        if moved.dtype != self.dtype_marker.dtype or moved.device != self.dtype_marker.device:
            raise ValueError(
                f"{self._where()}: an exported {self.info.model_name} compiled for {self.info.dtype} on "
                f"{self.info.device} cannot be moved to {str(moved.dtype).removeprefix('torch.')} on {moved.device}: "
                f"pass dtype=torch.{self.info.dtype} and device={self.info.device!r}, or export it again "
                f"(scn export --dtype/--device)"
            )
        return self

    def check_inputs(self, batch: AtomicBatch) -> None:
        """Raise ``StructureError`` (a ``ValueError``) on input the model cannot handle, as the
        model's own ``check_inputs`` does, and ``ValueError`` for a batch in another dtype or
        on another device than the program's."""
        if batch.positions.dtype != self.dtype or batch.positions.device.type != self.device.type:
            raise ValueError(
                f"{self._where()}: the batch is {str(batch.positions.dtype).removeprefix('torch.')} on "
                f"{batch.positions.device}, the exported program {self.info.dtype} on {self.info.device}"
            )
        validate_batch(batch, max_atomic_number=self.info.max_atomic_number)

    def forward(self, batch: AtomicBatch, graph: Graph | None = None, stress: bool = False) -> dict[str, torch.Tensor]:
        """Energy ``[S]`` and forces ``[N, 3]`` of every structure in ``batch`` (``graph``: a
        prebuilt graph with this model's options, else it is built)."""
        if stress:
            raise NoStressError(
                f"{self._where()}: an exported model computes energies and forces only, no stress; "
                "use the checkpoint for stress (and cell relaxations)"
            )
        self.check_inputs(batch)
        outputs = self.program(*flat_inputs(batch, self.info.graph, graph))
        out = {"energy": outputs[0].detach()}
        if self.regress_forces:
            out["forces"] = outputs[1].detach()
        return out

    def extra_repr(self) -> str:
        i = self.info
        return f"{i.model_name}, {i.format}, {i.dtype} on {i.device}, conservative={i.conservative}"


def load_program(path: Path, info: ArtefactInfo) -> Callable[..., tuple[torch.Tensor, ...]]:
    """The callable program of the artefact at ``path`` (runs code from the file: the caller
    decides whether it is trusted)."""
    if info.format == "aoti":
        device = torch.device(info.device)
        index = device.index if device.index is not None else (0 if device.type != "cpu" else -1)
        return torch._inductor.aoti_load_package(str(path), device_index=index)
    return torch.export.load(str(path)).module()


def load_exported(path: str | Path, trust_pickle: bool = False) -> ExportedModel:
    """The :class:`ExportedModel` in ``path`` (written by :func:`~.export.export_model` or
    ``scn export``), in eval mode.

    Args:
        path: the ``.pt2`` file.
        trust_pickle: loading runs code from the file (module docstring): required, with an
            :class:`~spherical_channels.security.UntrustedPickleWarning`.

    Raises:
        FileNotFoundError: no such file.
        ExportError: not an artefact of this package, one without the opt-in, or one that this
            torch cannot load (the message names the torch version that wrote it).
    """
    path = Path(path)
    info = read_info(path)  # reads JSON only: safe before the opt-in
    if not trust_pickle:
        raise ExportError(
            f"{path}: loading an exported model runs code from the file ({_what_runs(info)}). If you "
            f"trust the file (e.g. you exported it), {OPT_IN_HINT}"
        )
    warnings.warn(
        f"{path}: loading an exported model (trust_pickle=True): this runs code from the file",
        UntrustedPickleWarning,
        stacklevel=2,
    )
    try:
        program = load_program(path, info)
    except Exception as err:  # noqa: BLE001 - a file this torch cannot load
        lines = str(err).strip().splitlines() or [""]
        raise ExportError(
            f"{path}: cannot load this {info.format} artefact (written with torch {info.torch_version}, "
            f"this is torch {torch.__version__}): {type(err).__name__}: {lines[0][:200]}"
        ) from None
    return ExportedModel(program, info, path).eval()


def _what_runs(info: ArtefactInfo) -> str:
    if info.format == "aoti":
        return "an AOTInductor package is a compiled shared library"
    return "an exported program unpickles its tensors"

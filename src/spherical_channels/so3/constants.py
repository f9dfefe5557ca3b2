"""A module base class for constant tensors that stay exact under dtype changes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["ConstantsModule", "float64_default"]


class ConstantsModule(torch.nn.Module):
    """Holds constants (sampling matrices, Wigner blocks of fixed rotations, ...) as buffers.

    Constants are computed once, in float64, at construction. Each is registered as a
    non-persistent buffer in the default dtype; ``module.to(dtype)`` / ``.double()`` / ``.cuda()``
    re-derive the buffer from the float64 master, so a model moved to float64 gets float64-exact
    constants rather than float32 values cast up.
    """

    def __init__(self) -> None:
        super().__init__()
        self._constant_masters: dict[str, torch.Tensor] = {}

    def register_constant(self, name: str, value: torch.Tensor) -> None:
        """Register ``value`` (any float dtype, computed in float64 ideally) as a constant."""
        master = value.detach().to("cpu", torch.float64)
        self._constant_masters[name] = master
        self.register_buffer(name, master.to(torch.get_default_dtype()), persistent=False)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - torch's private signature
        super()._apply(fn, recurse)
        for name, master in self._constant_masters.items():
            current = self._buffers[name]
            self._buffers[name] = master.to(device=current.device, dtype=current.dtype)
        return self


@contextlib.contextmanager
def float64_default() -> Iterator[None]:
    """Temporarily make float64 the default dtype.

    Some e3nn constructors (``o3.wigner_D``'s generators, ``ToS2Grid`` without ``dtype``) build
    their tensors in the default dtype; under float32 their "float64" results carry 1e-7 errors.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)

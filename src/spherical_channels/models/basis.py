"""Radial (distance) expansions used by SCN's edge features."""

from __future__ import annotations

import torch

from ..so3.constants import ConstantsModule

__all__ = ["DISTANCE_EXPANSIONS", "make_distance_expansion", "GaussianExpansion"]


class _OffsetExpansion(ConstantsModule):
    """Base of the expansions whose functions are centred on ``linspace(start, stop, num)``."""

    def __init__(self, start: float, stop: float, num: int, width_scalar: float) -> None:
        super().__init__()
        if num < 2:
            raise ValueError(f"need at least 2 basis functions, got {num}")
        offsets = torch.linspace(start, stop, num, dtype=torch.float64)
        self.spacing = float(offsets[1] - offsets[0])
        self.width_scalar = width_scalar
        self.num_output = num
        self.register_constant("offset", offsets)

    def set_offsets(self, offsets: torch.Tensor) -> None:
        """Use the given centres (e.g. the float32 buffer an official checkpoint carries, which
        the official model uses as loaded) instead of the computed ones; shape ``[num]``."""
        if offsets.shape != self.offset.shape:
            raise ValueError(f"expected {tuple(self.offset.shape)} offsets, got {tuple(offsets.shape)}")
        current = self.offset
        self._constant_masters["offset"] = offsets.detach().to("cpu", torch.float64)
        self._buffers["offset"] = offsets.detach().to(device=current.device, dtype=current.dtype)

    def _shifted(self, distance: torch.Tensor) -> torch.Tensor:
        return distance.unsqueeze(-1) - self.offset.to(distance.dtype)


class GaussianExpansion(_OffsetExpansion):
    """``exp(-(d - mu_k)^2 / (2 (width * spacing)^2))``: ``[E]`` -> ``[E, num]``."""

    def forward(self, distance: torch.Tensor) -> torch.Tensor:
        coeff = -0.5 / (self.width_scalar * self.spacing) ** 2
        return torch.exp(coeff * self._shifted(distance) ** 2)


class SigmoidExpansion(_OffsetExpansion):
    """``sigmoid(width / spacing * (d - mu_k))``: ``[E]`` -> ``[E, num]``."""

    def forward(self, distance: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((self.width_scalar / self.spacing) * self._shifted(distance))


class LinearSigmoidExpansion(_OffsetExpansion):
    """Sigmoid expansion plus a small linear term (keeps gradients alive far from the centres)."""

    def forward(self, distance: torch.Tensor) -> torch.Tensor:
        scaled = (self.width_scalar / self.spacing) * self._shifted(distance)
        return torch.sigmoid(scaled) + 0.001 * scaled


class SiLUExpansion(torch.nn.Module):
    """A learned expansion: ``SiLU(Linear([d, 1]))``: ``[E]`` -> ``[E, num]``."""

    def __init__(self, start: float, stop: float, num: int, width_scalar: float) -> None:
        super().__init__()
        self.num_output = num
        self.fc1 = torch.nn.Linear(2, num)

    def forward(self, distance: torch.Tensor) -> torch.Tensor:
        d = distance.unsqueeze(-1)
        return torch.nn.functional.silu(self.fc1(torch.cat([d, torch.ones_like(d)], dim=-1)))


DISTANCE_EXPANSIONS: dict[str, type[torch.nn.Module]] = {
    "gaussian": GaussianExpansion,
    "sigmoid": SigmoidExpansion,
    "linearsigmoid": LinearSigmoidExpansion,
    "silu": SiLUExpansion,
}


def make_distance_expansion(
    name: str, cutoff: float, resolution: float, width_scalar: float
) -> torch.nn.Module:
    """The expansion ``name`` with ``int(cutoff / resolution)`` functions over ``[0, cutoff]``."""
    try:
        cls = DISTANCE_EXPANSIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown distance_function {name!r}; expected one of {sorted(DISTANCE_EXPANSIONS)}"
        ) from None
    return cls(0.0, cutoff, int(cutoff / resolution), width_scalar)

"""Per-edge frames: the rotation that takes an edge direction onto the polar axis (+y).

SCN rotates both end points' embeddings into a frame in which the edge lies along e3nn's polar
axis y. The roll about that axis is free. Two rules are provided:

* ``"fixed"``: a deterministic rule (the one the reference fixtures were made with), so that the
  same structure always gets the same prediction;
* ``"random"``: the fixed frame followed by a uniformly random roll about y, per edge (the
  training default of the paper).

Unlike the official implementation the frames are not detached, so energy-conserving forces can
differentiate through them (the Wigner-D matrices built from them are polynomial in their
entries, hence finite gradients everywhere).
"""

from __future__ import annotations

import math

import torch

__all__ = ["ROLL_MODES", "edge_frames", "fixed_roll_frames", "identity_frames", "reference_a", "roll_about_y"]

ROLL_MODES = ("fixed", "random", "none")

# Reference vectors of the fixed roll rule: refA . refB == 0, so for |x . refA| > 0.9 the edge is
# far from refB (|x . refB| <= sin(acos 0.9) = 0.44) and the cross product never degenerates.
_REF_A = (0.3, 0.5, 0.8)
_REF_B = (0.5, -0.3, 0.0)
_SWITCH = 0.9


def roll_about_y(angle: torch.Tensor) -> torch.Tensor:
    """Rotation by ``angle`` about the y axis in the official code's sign convention.

    ``[[cos, 0, -sin], [0, 1, 0], [sin, 0, cos]]``; applied *after* an edge frame it rolls the
    frame about the edge. Shape: ``angle [...]`` -> ``[..., 3, 3]``.
    """
    c, s = torch.cos(angle), torch.sin(angle)
    zero, one = torch.zeros_like(angle), torch.ones_like(angle)
    rows = [
        torch.stack([c, zero, -s], dim=-1),
        torch.stack([zero, one, zero], dim=-1),
        torch.stack([s, zero, c], dim=-1),
    ]
    return torch.stack(rows, dim=-2)


def reference_a(like: torch.Tensor) -> torch.Tensor:
    """The fixed roll rule's first reference vector, unit length, ``[3]``."""
    ref = like.new_tensor(_REF_A)
    return ref / torch.linalg.vector_norm(ref)


def fixed_roll_frames(edge_vec: torch.Tensor, use_b: torch.Tensor | None = None) -> torch.Tensor:
    """Deterministic edge frames ``R`` with ``R @ unit(edge_vec) = (0, 1, 0)``.

    Rule (``tests/fixtures/README.md``): ``ref = refB if |x . refA| > 0.9 else refA``;
    ``z = unit(x × ref)``, ``y = unit(x × z)``, ``R = rows [z; x; -y]``.

    Args:
        edge_vec: ``[E, 3]`` edge vectors (need not be unit length, must be non-zero).
        use_b: ``[E]`` bool, which edges take reference B (default: the rule above; the smooth
            SCN chooses per edge copy, see :mod:`spherical_channels.models.smooth`).

    Returns:
        ``[E, 3, 3]`` proper rotations, differentiable wrt ``edge_vec``.
    """
    x = edge_vec / torch.linalg.vector_norm(edge_vec, dim=-1, keepdim=True)
    ref_a = reference_a(edge_vec)
    ref_b = edge_vec.new_tensor(_REF_B)
    ref_b = ref_b / torch.linalg.vector_norm(ref_b)
    if use_b is None:
        use_b = (x @ ref_a).abs() > _SWITCH
    ref = torch.where(use_b.unsqueeze(-1), ref_b, ref_a).expand_as(x)
    z = torch.linalg.cross(x, ref, dim=-1)
    z = z / torch.linalg.vector_norm(z, dim=-1, keepdim=True)
    y = torch.linalg.cross(x, z, dim=-1)
    y = y / torch.linalg.vector_norm(y, dim=-1, keepdim=True)
    return torch.stack([z, x, -y], dim=-2)


def identity_frames(edge_vec: torch.Tensor) -> torch.Tensor:
    """The paper's "no rotation" ablation: every edge uses the identity frame. ``[E, 3, 3]``."""
    eye = torch.eye(3, dtype=edge_vec.dtype, device=edge_vec.device)
    return eye.expand(edge_vec.shape[0], 3, 3)


def edge_frames(
    edge_vec: torch.Tensor,
    roll: str = "fixed",
    generator: torch.Generator | None = None,
    use_b: torch.Tensor | None = None,
) -> torch.Tensor:
    """Edge frames under a roll rule.

    Args:
        edge_vec: ``[E, 3]`` edge vectors.
        roll: ``"fixed"`` (deterministic), ``"random"`` (fixed frame then a uniform random roll
            about the edge, per edge), or ``"none"`` (identity: the no-rotation ablation).
        generator: random generator for ``"random"``.
        use_b: per-edge reference choice of the fixed rule (see :func:`fixed_roll_frames`).

    Returns:
        ``[E, 3, 3]``; for ``"fixed"`` and ``"random"``, ``R @ unit(edge_vec) = (0, 1, 0)``.
    """
    if roll == "fixed":
        return fixed_roll_frames(edge_vec, use_b)
    if roll == "random":
        angle = torch.rand(
            edge_vec.shape[0], generator=generator, dtype=edge_vec.dtype, device=edge_vec.device
        ) * (2.0 * math.pi)
        return roll_about_y(angle) @ fixed_roll_frames(edge_vec, use_b)
    if roll == "none":
        return identity_frames(edge_vec)
    raise ValueError(f"unknown roll rule {roll!r}; expected one of {ROLL_MODES}")

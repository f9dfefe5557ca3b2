"""SpinConv's geometry: edge frames, which neighbours land on which sphere, the bilinear splat
onto the latitude x longitude grid, and the per-atom frames of the force-centric output block.

Every function follows the official OCP code's numerics (``ocpmodels/models/spinconv.py``);
the additions are the pole rule (a deterministic longitude for points on a pole) and the fixed
force frames (deterministic inference), both as the official fixtures define them.

Conventions (E edges j -> i, ``vectors[e] = pos_j + n.cell - pos_i``; N atoms; P points):

* an edge's frame has rows ``[x; y; z]`` with ``x`` the unit edge vector; ``frame @ u`` gives
  a direction ``u`` in the edge's coordinates;
* a point ``v`` (unit, in a sphere's coordinates) has longitude ``atan2(v_y, v_z)`` and
  latitude ``asin(v_x)``: the edge direction is the north pole, and the spin (longitude) is
  the roll about the edge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "SEQUENCE_GENERATOR",
    "SphereSplat",
    "axis_frames",
    "edge_frames",
    "edge_sphere_points",
    "fixed_rotation_indices",
    "force_frames",
    "rotate_points",
    "rotations_from_uniforms",
    "sequence_uniforms",
    "sphere_splat",
    "unit_vectors",
]

#: g with g^4 = g + 1: the R3 low-discrepancy sequence u[m, k] = (0.5 + (m + 1) g^-(k+1)) mod 1
#: that the fixtures use for the force frames instead of ``torch.rand``.
SEQUENCE_GENERATOR = 1.2207440846057596

# Constants of the official splat: latitudes are squeezed into [0.005, 0.995] of the rows (so a
# pole lies strictly between the first two rows), the frame's reference vector gets 1e-4 added
# (never exactly zero) and its cross products 1e-7 (a degenerate frame stays finite).
_LATITUDE_MARGIN = 0.005
_REFERENCE_OFFSET = 1e-4
_NORM_EPS = 1e-7


def edge_frames(
    vectors: torch.Tensor, target: torch.Tensor, num_atoms: int, cutoff: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames ``[E, 3, 3]`` (rows x, y, z) of edges with ``vectors [E, 3]`` into ``target [E]``,
    and each frame's sine ``[E]`` (detached; see below).

    x is the unit edge vector; the roll about it is fixed by the target atom's environment:
    the cosine-weighted sum ``a_i`` of the target's edge vectors (plus 1e-4 on every component,
    as the official code), ``z = x × â`` and ``y = x × z``, each normalised. The frame turns
    with the structure (up to the 1e-4 offset). The sine ``|x × â|`` measures how well the roll
    is defined: as it goes to 0 (an edge along ``a_i``; in a centrosymmetric site ``a_i = 0``
    and the reference is the offset's direction (1, 1, 1)) the roll turns ever faster with the
    geometry, and at 0 the official frame degenerates (its y and z rows shrink to ~0).
    """
    # tiny under the square roots: no value changes (it is far below any sum's last bit), but a
    # frame that degenerates exactly (x parallel to the reference) gets a finite gradient, not NaN
    tiny = torch.finfo(vectors.dtype).tiny
    length = torch.sqrt(torch.sum(vectors**2, dim=1))
    weight = 0.5 * (torch.cos(length * math.pi / cutoff) + 1.0)
    environment = torch.zeros(num_atoms, 3, dtype=vectors.dtype, device=vectors.device)
    environment = environment.index_add(0, target, vectors * weight.view(-1, 1))
    reference = environment[target] + _REFERENCE_OFFSET
    x = vectors / length.view(-1, 1)
    reference = reference / torch.sqrt(torch.sum(reference**2, dim=1) + tiny).view(-1, 1)
    z = torch.cross(x, reference, dim=1)
    sine = torch.sqrt(torch.sum(z.detach() ** 2, dim=1))
    z = z / (torch.sqrt(torch.sum(z**2, dim=1, keepdim=True) + tiny) + _NORM_EPS)
    y = torch.cross(x, z, dim=1)
    y = y / (torch.sqrt(torch.sum(y**2, dim=1, keepdim=True) + tiny) + _NORM_EPS)
    return torch.stack([x, y, z], dim=1), sine


def edge_sphere_points(edge_index: torch.Tensor, num_atoms: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which messages each edge's sphere holds: for edge e = (j -> i), every edge k -> j into
    its source j (the reverse edge i -> j among them), in edge order.

    Returns ``(sphere [P], source [P])``: the edge whose sphere a point is on and the edge whose
    message (and direction) it carries, ordered by sphere, then as the edges.
    """
    source_atom, target_atom = edge_index[0], edge_index[1]
    device = edge_index.device
    by_target = torch.sort(target_atom, stable=True).indices  # edges grouped by target, in edge order
    counts = torch.bincount(target_atom, minlength=num_atoms)
    starts = torch.cumsum(counts, 0) - counts
    per_edge = counts[source_atom]  # points on each edge's sphere
    sphere = torch.repeat_interleave(torch.arange(edge_index.shape[1], device=device), per_edge)
    first = torch.cumsum(per_edge, 0) - per_edge
    rank = torch.arange(sphere.shape[0], device=device) - first[sphere]
    source = by_target[starts[source_atom][sphere] + rank]
    return sphere, source


@dataclass
class SphereSplat:
    """Bilinear splat of P points onto ``num_spheres`` grids of ``lat x lon`` cells.

    Attributes:
        index: ``[4, P]`` flat cell (``sphere * lat * lon + row * lon + column``) of each
            point's four corners, in the official order (r0c0, r0c1, r1c0, r1c1).
        weight: ``[4, P]`` their bilinear weights (sum 1 per point).
        source: ``[P]`` the message row each point carries.
        num_spheres: number of grids.
    """

    index: torch.Tensor
    weight: torch.Tensor
    source: torch.Tensor
    num_spheres: int


def _grid_coordinates(
    points: torch.Tensor, lat: int, lon: int, smooth_latitude: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Column and row coordinates ``[P]`` (grid units) of unit points ``[P, 3]``."""
    column = torch.atan2(points[:, 1], points[:, 2])
    column = (column + math.pi) / (2.0 * math.pi)
    if smooth_latitude:
        # asin(v_x) written as atan2(v_x, rho): the same angle, with a finite gradient up to the pole
        rho = torch.sqrt(points[:, 1] ** 2 + points[:, 2] ** 2)
        row = torch.atan2(points[:, 0], rho)
    else:
        row = torch.clamp(points[:, 0], min=-1.0, max=1.0).asin()
    row = (row + math.pi / 2.0) / math.pi
    row = (1.0 - 2 * _LATITUDE_MARGIN) * row + _LATITUDE_MARGIN
    return column * lon, row * (lat - 1.0)


def sphere_splat(
    points: torch.Tensor,
    sphere: torch.Tensor,
    source: torch.Tensor,
    num_spheres: int,
    lat: int,
    lon: int,
    pole_rule: str = "snap",
    pole_tolerance: float = 1e-5,
    differentiable: bool = True,
    smooth_latitude: bool = False,
) -> SphereSplat:
    """The official bilinear splat of ``points [P, 3]`` (unit vectors in their sphere's frame)
    onto grids ``sphere [P]``; ``source [P]`` is carried along.

    Args:
        pole_rule: ``"snap"``: a point within ``pole_tolerance`` of the pole axis
            (``sqrt(v_y^2 + v_z^2) < tol``) is put exactly on the pole ``(sign v_x, +0, +0)``,
            so its longitude is atan2(+0, +0) = 0 rather than that of its rounding noise (the
            fixtures' rule); such a point carries no angular gradient. ``"official"``: no snap.
        differentiable: ``False`` detaches the weights from the geometry (the official
            energy-centric model builds them under ``no_grad``).
        smooth_latitude: compute the latitude as ``atan2(v_x, rho)`` instead of the official
            ``asin(clamp(v_x))`` (equal on the unit sphere; finite gradient near the poles).
    """
    if pole_rule not in ("snap", "official"):
        raise ValueError(f"pole_rule must be 'snap' or 'official', got {pole_rule!r}")
    on_pole = None
    if pole_rule == "snap" and points.shape[0]:
        detached = points.detach()
        on_pole = torch.sqrt(detached[:, 1] ** 2 + detached[:, 2] ** 2) < pole_tolerance
        if bool(on_pole.any()):
            # The pole points' coordinates are replaced by the poles' own, never differentiated;
            # a regular stand-in keeps atan2 and asin (infinite slope at the poles) out of their
            # gradient, so no NaN can reach the others'.
            stand_in = torch.tensor([0.0, 0.0, 1.0], dtype=points.dtype, device=points.device)
            points = torch.where(on_pole.view(-1, 1), stand_in, points)
        else:
            on_pole = None
    column, row = _grid_coordinates(points, lat, lon, smooth_latitude)
    if on_pole is not None:
        # Both poles through the same formula, in the same dtype: bitwise the fixtures' values.
        poles = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]], dtype=points.dtype, device=points.device)
        pole_column, pole_row = _grid_coordinates(poles, lat, lon, smooth_latitude)
        south = (detached[:, 0] < 0).long()
        column = torch.where(on_pole, pole_column[south], column)
        row = torch.where(on_pole, pole_row[south], row)

    column_0 = torch.floor(column).long()
    column_frac = column - column_0
    column_0 = column_0 % lon
    column_1 = (column_0 + 1) % lon
    row_0 = torch.floor(row).long()
    row_frac = row - row_0
    row_0 = row_0 % lat
    row_1 = (row_0 + 1) % lat

    base = sphere * (lat * lon)
    index = torch.stack([
        base + row_0 * lon + column_0,
        base + row_0 * lon + column_1,
        base + row_1 * lon + column_0,
        base + row_1 * lon + column_1,
    ])
    weight = torch.stack([
        (1.0 - column_frac) * (1.0 - row_frac),
        column_frac * (1.0 - row_frac),
        (1.0 - column_frac) * row_frac,
        column_frac * row_frac,
    ])
    if not differentiable:
        weight = weight.detach()
    return SphereSplat(index=index, weight=weight, source=source, num_spheres=num_spheres)


def rotate_points(frames: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """``frames [P, 3, 3] @ directions [P, 3]`` -> ``[P, 3]`` (as the official ``bmm``)."""
    return torch.bmm(frames, directions.unsqueeze(-1)).squeeze(-1)


def unit_vectors(vectors: torch.Tensor) -> torch.Tensor:
    """``vectors [E, 3]`` normalised (``F.normalize``, as the official splat)."""
    return F.normalize(vectors, dim=-1)


# ---------------------------------------------------------------------------- force frames
def sequence_uniforms(indices: torch.Tensor) -> torch.Tensor:
    """Element ``m`` of the R3 sequence for each of ``indices [M]``: ``[M, 3]`` float64 in
    [0, 1), ``u[m, k] = (0.5 + (m + 1) g^-(k+1)) mod 1`` (float64, as the fixtures)."""
    alpha = torch.tensor([SEQUENCE_GENERATOR ** -(k + 1) for k in range(3)], dtype=torch.float64, device=indices.device)
    m = (indices.to(torch.float64) + 1.0).view(-1, 1)
    return torch.remainder(0.5 + m * alpha.view(1, 3), 1.0)


def rotations_from_uniforms(u: torch.Tensor) -> torch.Tensor:
    """Rotations ``[M, 3, 3]`` from uniforms ``u [M, 3]`` (in the model's dtype) by the
    official ``_random_rot_mat`` construction: angles ``2 pi u`` about x, y and z,
    ``A = (rot_x(a) @ rot_y(b)) @ rot_z(c)``."""
    angles = [2.0 * math.pi * u[:, k].contiguous() for k in range(3)]
    cos = [torch.cos(a) for a in angles]
    sin = [torch.sin(a) for a in angles]
    eye = torch.eye(3, dtype=u.dtype, device=u.device).expand(u.shape[0], 3, 3)
    rot_a, rot_b, rot_c = eye.clone(), eye.clone(), eye.clone()
    rot_a[:, 1, 1], rot_a[:, 1, 2], rot_a[:, 2, 1], rot_a[:, 2, 2] = cos[0], sin[0], -sin[0], cos[0]
    rot_b[:, 0, 0], rot_b[:, 0, 2], rot_b[:, 2, 0], rot_b[:, 2, 2] = cos[1], -sin[1], sin[1], cos[1]
    rot_c[:, 0, 0], rot_c[:, 0, 1], rot_c[:, 1, 0], rot_c[:, 1, 1] = cos[2], sin[2], -sin[2], cos[2]
    return torch.bmm(torch.bmm(rot_a, rot_b), rot_c)


def fixed_rotation_indices(natoms: torch.Tensor, num_rotations: int, shared: bool) -> torch.Tensor:
    """Sequence indices ``[R, N]`` of the fixed force frames of a batch with ``natoms [S]``.

    ``shared=False`` (the fixtures' rule): rotation r of atom n (of a structure of N_s atoms,
    numbered from 0 in its structure) is element ``r N_s + n``: every atom has its own frames,
    and a structure gets the same ones alone or in a batch. ``shared=True``: element r for
    every atom (frames independent of the atoms' order).
    """
    device = natoms.device
    r = torch.arange(num_rotations, device=device).view(-1, 1)
    if shared:
        return r.expand(num_rotations, int(natoms.sum()))
    structure = torch.repeat_interleave(torch.arange(natoms.shape[0], device=device), natoms)
    local = torch.arange(structure.shape[0], device=device) - (torch.cumsum(natoms, 0) - natoms)[structure]
    return r * natoms[structure].view(1, -1) + local.view(1, -1)


def force_frames(
    rule: str, natoms: torch.Tensor, num_rotations: int, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """The force block's rotations ``[R, N, 3, 3]`` by ``rule``: ``"random"`` (the official
    code: uniform Euler angles drawn with ``torch.rand`` on every call), ``"fixed"`` or
    ``"fixed_shared"`` (the R3 sequence; :func:`fixed_rotation_indices`)."""
    num_atoms = int(natoms.sum())
    if rule == "random":
        u = torch.rand(num_rotations * num_atoms, 3, dtype=dtype, device=device)
        return rotations_from_uniforms(u).view(num_rotations, num_atoms, 3, 3)
    if rule not in ("fixed", "fixed_shared"):
        raise ValueError(f"force rotation rule must be 'random', 'fixed' or 'fixed_shared', got {rule!r}")
    indices = fixed_rotation_indices(natoms.to(device), num_rotations, shared=rule == "fixed_shared")
    if rule == "fixed_shared":
        matrices = rotations_from_uniforms(sequence_uniforms(indices[:, 0]).to(dtype))
        return matrices.view(num_rotations, 1, 3, 3).expand(num_rotations, num_atoms, 3, 3)
    u = sequence_uniforms(indices.reshape(-1)).to(dtype)
    return rotations_from_uniforms(u).view(num_rotations, num_atoms, 3, 3)


def axis_frames(rotations: torch.Tensor) -> torch.Tensor:
    """``[R, N, 3, 3]`` -> ``[R, 3, N, 3, 3]``: for each rotation A the three frames whose
    first row is A's x, y and z axis (the official ``rot_mat_{x,y,z} @ A``, whose 0/1 entries
    make them exact row permutations of A)."""
    a0, a1, a2 = rotations[..., 0, :], rotations[..., 1, :], rotations[..., 2, :]
    frame_x = rotations
    frame_y = torch.stack([a1, -a0, a2], dim=-2)
    frame_z = torch.stack([a2, a1, -a0], dim=-2)
    return torch.stack([frame_x, frame_y, frame_z], dim=1)

"""Edge frames: proper rotations taking the edge onto +y, fixed and random roll."""

import math

import pytest
import torch

from spherical_channels.so3.frames import edge_frames, fixed_roll_frames, roll_about_y

AXES = torch.tensor(
    [[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=torch.float64
)


def directions(n: int = 200) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    near = AXES + 1e-6 * torch.randn(6, 3, generator=g, dtype=torch.float64)
    return torch.cat([AXES, near, torch.randn(n, 3, generator=g, dtype=torch.float64)])


@pytest.mark.parametrize("roll", ["fixed", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_frames_are_rotations_onto_y(roll: str, dtype: torch.dtype) -> None:
    vec = (3.0 * directions()).to(dtype)
    rot = edge_frames(vec, roll, generator=torch.Generator().manual_seed(1))
    eye = torch.eye(3, dtype=dtype).expand_as(rot)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(rot @ rot.transpose(1, 2), eye, atol=tol, rtol=0)
    torch.testing.assert_close(torch.linalg.det(rot), torch.ones(len(vec), dtype=dtype), atol=tol, rtol=0)
    unit = vec / vec.norm(dim=1, keepdim=True)
    target = torch.tensor([0.0, 1.0, 0.0], dtype=dtype).expand_as(unit)
    torch.testing.assert_close((rot @ unit.unsqueeze(-1)).squeeze(-1), target, atol=tol, rtol=0)


def test_fixed_rule_reference_switch() -> None:
    ref_a = torch.tensor([0.3, 0.5, 0.8], dtype=torch.float64)
    ref_a = ref_a / ref_a.norm()
    rot = fixed_roll_frames(ref_a.unsqueeze(0))  # |x . refA| = 1 > 0.9: uses refB
    ref_b = torch.tensor([0.5, -0.3, 0.0], dtype=torch.float64)
    z = torch.linalg.cross(ref_a, ref_b / ref_b.norm(), dim=0)
    torch.testing.assert_close(rot[0, 0], z / z.norm())


def test_random_roll_is_a_roll_of_the_fixed_frame() -> None:
    vec = directions(50)
    fixed = fixed_roll_frames(vec)
    rolled = edge_frames(vec, "random", generator=torch.Generator().manual_seed(3))
    relative = rolled @ fixed.transpose(1, 2)  # must be a rotation about y
    angle = torch.atan2(-relative[:, 0, 2], relative[:, 0, 0])
    torch.testing.assert_close(relative, roll_about_y(angle), atol=1e-12, rtol=0)
    assert angle.std() > 1.0  # the rolls are spread over the circle


def test_frames_have_finite_gradients_along_axes() -> None:
    vec = directions(20).requires_grad_(True)
    weights = torch.randn(len(vec), 3, 3, dtype=torch.float64)
    (grad,) = torch.autograd.grad((fixed_roll_frames(vec) * weights).sum(), vec)
    assert torch.isfinite(grad).all()


def test_roll_about_y_matches_official_convention() -> None:
    phi = torch.tensor(0.3, dtype=torch.float64)
    c, s = math.cos(0.3), math.sin(0.3)
    expected = torch.tensor([[c, 0, -s], [0, 1, 0], [s, 0, c]], dtype=torch.float64)
    torch.testing.assert_close(roll_about_y(phi), expected)

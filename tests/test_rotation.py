import math

import pytest
import torch

from hands import rotation


def random_rotations(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    axis = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1)
    angle = torch.rand(n, 1, generator=g) * (math.pi - 1e-3)
    return axis * angle


def test_axis_angle_matrix_round_trip():
    aa = random_rotations(64)
    R = rotation.axis_angle_to_matrix(aa)
    torch.testing.assert_close(R @ R.transpose(-1, -2), torch.eye(3).expand(64, 3, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(64), atol=1e-5, rtol=0)
    torch.testing.assert_close(rotation.matrix_to_axis_angle(R), aa, atol=1e-4, rtol=0)


def test_axis_angle_matches_rodrigues_by_hand():
    # 90 degrees about z maps x to y
    R = rotation.axis_angle_to_matrix(torch.tensor([0.0, 0.0, math.pi / 2]))
    torch.testing.assert_close(R @ torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0]), atol=1e-6, rtol=0)


def test_rot6d_convention_is_first_two_columns_row_major():
    R = rotation.axis_angle_to_matrix(random_rotations(8))
    six = rotation.matrix_to_rot6d(R)
    expected = torch.stack([R[:, 0, 0], R[:, 0, 1], R[:, 1, 0], R[:, 1, 1], R[:, 2, 0], R[:, 2, 1]], -1)
    torch.testing.assert_close(six, expected)


def test_rot6d_round_trip_and_gram_schmidt():
    R = rotation.axis_angle_to_matrix(random_rotations(32, seed=1))
    torch.testing.assert_close(rotation.rot6d_to_matrix(rotation.matrix_to_rot6d(R)), R, atol=1e-5, rtol=0)
    # an arbitrary 6D vector still gives a proper rotation
    M = rotation.rot6d_to_matrix(torch.randn(16, 6))
    torch.testing.assert_close(M @ M.transpose(-1, -2), torch.eye(3).expand(16, 3, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(M), torch.ones(16), atol=1e-5, rtol=0)
    aa = random_rotations(8, seed=2)
    torch.testing.assert_close(rotation.rot6d_to_axis_angle(rotation.axis_angle_to_rot6d(aa)), aa, atol=1e-4, rtol=0)


def test_rotations_keep_leading_dims():
    aa = random_rotations(12).reshape(2, 2, 3, 3)
    assert rotation.axis_angle_to_matrix(aa).shape == (2, 2, 3, 3, 3)
    assert rotation.axis_angle_to_rot6d(aa).shape == (2, 2, 3, 6)


def test_mirror_axis_angle_is_reflection_conjugate():
    # mirroring through x = 0 (S = diag(-1, 1, 1)) conjugates a rotation: S R S
    aa = random_rotations(10, seed=3)
    S = torch.diag(torch.tensor([-1.0, 1.0, 1.0]))
    expected = S @ rotation.axis_angle_to_matrix(aa) @ S
    got = rotation.axis_angle_to_matrix(rotation.mirror_axis_angle(aa))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    pose = torch.randn(4, 48)
    torch.testing.assert_close(rotation.mirror_axis_angle(rotation.mirror_axis_angle(pose)), pose)

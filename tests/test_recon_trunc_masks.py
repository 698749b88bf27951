"""The 2D terms of IntagHand's and IHMR's losses read joints_trunc (InterWild's joint_trunc: 2D label inside the
image), their 3D terms joints_valid: a batch whose joints are all truncated in 2D loses exactly its 2D joint terms.
(InterWild's and InterShape's are in their own test files.)"""
from __future__ import annotations

import pytest
import torch

from hands.mano import HandModel
from hands.sample import collate
from recon.registry import build_regressor, load_builtin_regressors
from tests.recon_helpers import rendered_two_hand_samples

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def hand_model() -> HandModel:
    return HandModel()


@pytest.mark.parametrize(
    "arch, two_d, three_d",
    [
        ("intaghand", {"heatmap"}, {"verts", "joints", "coarse_verts", "normal"}),
        ("ihmr", {"joints_2d"}, {"joints_3d", "pose", "shape", "trans"}),
    ],
)
def test_joints_truncated_in_2d_drop_only_the_2d_joint_terms(hand_model, arch, two_d, three_d):
    from tests.test_recon_ihmr import TINY as IHMR_TINY
    from tests.test_recon_intaghand import SIZE, TINY as INTAGHAND_TINY

    load_builtin_regressors()
    kwargs, size = {"intaghand": (INTAGHAND_TINY, SIZE), "ihmr": (IHMR_TINY, 64)}[arch]
    torch.manual_seed(0)
    model = build_regressor(arch, **kwargs)
    batch = collate(rendered_two_hand_samples(hand_model, 2, size=size))
    out = model(batch)
    before = {k: float(v.detach()) for k, v in model.losses(out, batch).items()}
    for side in ("right", "left"):
        batch.hand(side).joints_trunc[:] = False
    after = {k: float(v.detach()) for k, v in model.losses(out, batch).items()}
    for name in two_d:
        assert before[name] > 0 and after[name] == 0.0, name
    for name in three_d:
        assert after[name] == pytest.approx(before[name]) and before[name] > 0, name

"""eval.genmetrics: FID/KID against closed forms and naive loops, the FID Inception network, hand crops,
hand confidence / MSE-2D / MSE-3D with stand-in detectors, and a tiny random CNN end to end."""
from __future__ import annotations

import builtins
import math

import numpy as np
import pytest
import torch
from torch import nn

from eval import genmetrics
from eval.genmetrics import GenerationEvaluator, HandKeypoints2D
from hands.camera import project
from tests.test_eval_evaluator import make_batch


# ---- FID ---------------------------------------------------------------------------------------------
def test_fid_identical_sets_is_zero_and_shift_gives_squared_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 8)) @ rng.normal(size=(8, 8))  # correlated features
    assert genmetrics.fid_from_features(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = rng.normal(size=8)
    # same sample covariance exactly, so FID = |mu_a - mu_b|^2
    assert genmetrics.fid_from_features(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6)


def test_fid_matches_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(5000, 4)) * np.array([1.0, 2.0, 0.5, 1.5])
    b = rng.normal(size=(5000, 4)) * np.array([2.0, 1.0, 0.5, 3.0]) + 0.3
    # closed form with the sample moments (the off-diagonal covariances are ~0): sum of per-dim terms
    mu_a, mu_b, var_a, var_b = a.mean(0), b.mean(0), a.var(0, ddof=1), b.var(0, ddof=1)
    want = float(((mu_a - mu_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum())
    assert genmetrics.fid_from_features(torch.tensor(a), torch.tensor(b)) == pytest.approx(want, rel=0.02)
    with pytest.raises(ValueError, match="features_fake: dimension"):
        genmetrics.fid_from_features(a, b[:, :3])
    with pytest.raises(ValueError, match="features_real"):
        genmetrics.fid_from_features(a[:1], b)


# ---- KID ---------------------------------------------------------------------------------------------
def naive_kid(x: np.ndarray, y: np.ndarray) -> float:
    d, m = x.shape[1], x.shape[0]
    k = lambda u, v: (u @ v / d + 1.0) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_naive_unbiased_mmd_on_the_full_sets():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(12, 5)), rng.normal(size=(12, 5)) + 0.5
    mean, std = genmetrics.kid_from_features(x, y, num_subsets=3, subset_size=50)  # subsets = whole sets
    assert mean == pytest.approx(naive_kid(x, y), rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    same, _ = genmetrics.kid_from_features(a, b, num_subsets=20, subset_size=100)
    shifted, _ = genmetrics.kid_from_features(a, b + 1.0, num_subsets=20, subset_size=100)
    assert abs(same) < 0.01 and shifted > 0.1


# ---- the FID Inception network ----------------------------------------------------------------------
def test_fid_inception_loads_a_state_dict_and_gives_2048_features(tmp_path):
    net = genmetrics.fid_inception_v3(device="meta")
    assert net.fc.out_features == 1008 and net.AuxLogits is None
    # the patched pooling: Mixed_7c max-pools, the others average without the padding
    assert type(net.Mixed_7c).max_pool and not type(net.Mixed_7b).max_pool
    state = {  # cheap constant weights, random first convolution; no step counters, as in files from TF
        k: torch.full(v.shape, 1.0 if k.endswith("running_var") else 0.01)
        for k, v in net.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    state["Conv2d_1a_3x3.conv.weight"] = torch.randn(state["Conv2d_1a_3x3.conv.weight"].shape) * 0.1
    features = genmetrics.InceptionFeatures(state, input_size=75)
    assert torch.equal(features.net.Conv2d_1a_3x3.conv.weight, state["Conv2d_1a_3x3.conv.weight"])
    assert not any(t.is_meta for t in features.state_dict().values())
    out = features(torch.rand(1, 3, 40, 40))
    assert out.shape == (1, 2048) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="not an FID Inception-v3 state dict"):
        genmetrics.InceptionFeatures({"fc.weight": torch.zeros(3, 3)})
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
        genmetrics.InceptionFeatures(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        genmetrics.InceptionFeatures(tmp_path / "junk.pth")


# ---- hand crops --------------------------------------------------------------------------------------
def test_hand_boxes_come_from_the_projected_meshes():
    batch = make_batch(["interacting", "right", "left"], size=32)
    batch.camera.K = torch.tensor([[60.0, 0, 16], [0, 60.0, 16], [0, 0, 1]]).repeat(3, 1, 1)
    batch.left.mano_valid[2] = False  # a present hand without a mesh falls back to its label box
    boxes, index, side = genmetrics.hand_boxes(batch)
    assert index.tolist() == [0, 0, 1, 2] and side.tolist() == [0, 1, 0, 1]
    uv = project(batch.right.verts_cam[0], batch.camera.K[0])
    assert torch.allclose(boxes[0], torch.cat([uv.amin(0), uv.amax(0)]), atol=1e-5)
    assert torch.equal(boxes[3], batch.left.bbox[2])
    crops = genmetrics.hand_crops(batch.image, batch, size=16)
    assert crops.shape == (4, 3, 16, 16)


# ---- hand confidence, MSE-2D, MSE-3D ------------------------------------------------------------------
class TinyCNN(nn.Module):
    """A random-init stand-in feature extractor (4 -> 8 channels)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU(), nn.Conv2d(4, 8, 3, 2, 1), nn.AdaptiveAvgPool2d(1))

    def forward(self, images):
        return 10.0 * self.net(images).flatten(1)  # scaled: distances well above round-off


def test_hand_confidence_and_mse_with_stand_in_detector_and_regressor():
    batch = make_batch(["interacting", "right"], size=32)
    offset_px = torch.tensor([3.0, 4.0])  # 5 px -> squared 25
    offset_m = torch.tensor([0.0, 0.006, 0.008])  # 10 mm on non-wrist joints -> squared 100 mm^2

    def detector(images):
        keypoints = torch.stack([batch.right.joints_img, batch.left.joints_img], 1) + offset_px
        confidence = torch.tensor([[0.9, 0.5], [0.8, 0.7]])
        confidence[0, 1] = 0.0  # sample 0's left hand not detected
        return HandKeypoints2D(keypoints_img=keypoints, confidence=confidence)

    def regressor(generated):  # a HandBatch holding the generated images
        assert generated.image is images
        right, left = batch.right.joints_cam.clone(), batch.left.joints_cam.clone()
        right[:, 1:] += offset_m
        left[:, 1:] += offset_m
        return {"right_joints": right - right[:, :1], "left_joints": left}  # wrist-relative or absolute

    images = batch.image.clone()
    evaluator = GenerationEvaluator(feature_extractor=TinyCNN().eval(), keypoint_detector=detector, joint_regressor=regressor)
    evaluator.add_generated(images, batch)
    res = evaluator.compute()
    # present hands: sample 0 right + left, sample 1 right (its left is absent: 0.7 ignored)
    assert res["HandConf-labelled"] == pytest.approx((0.9 + 0.0 + 0.8) / 3)
    assert res["HandConf"] == pytest.approx((0.9 + 0.8 + 0.7) / 3)  # Hand1000: every detection, labelled or not
    assert res["MSE-2D"] == pytest.approx(25.0, rel=1e-6)
    # present hands' valid joints count; the wrist's error is 0 after the alignment (as in MPJPE)
    valid = torch.stack([batch.right.joints_valid, batch.left.joints_valid], 1)  # (B, 2, 21)
    valid = valid & valid[..., :1] & torch.tensor([[True, True], [True, False]])[..., None]
    share = valid[..., 1:].sum().item() / valid.sum().item()
    assert res["MSE-3D"] == pytest.approx(100.0 * share, rel=1e-6)
    assert math.isnan(res["FID"])  # no real images added

    normalized = GenerationEvaluator(
        feature_extractor=TinyCNN().eval(), keypoint_detector=detector, joint_regressor=regressor,
        mse2d_unit="normalized", mse3d_unit="cm",
    )
    normalized.add_generated(images, batch)
    res = normalized.compute()
    assert res["MSE-2D"] == pytest.approx(25.0 / 32**2, rel=1e-6)
    assert res["MSE-3D"] == pytest.approx(1.0 * share, rel=1e-6)


def test_end_to_end_with_a_tiny_cnn():
    torch.manual_seed(0)
    batch = make_batch(["interacting"] * 6, size=32)
    batch.camera.K = torch.tensor([[60.0, 0, 16], [0, 60.0, 16], [0, 0, 1]]).repeat(6, 1, 1)
    extractor = TinyCNN().eval()
    same = GenerationEvaluator(feature_extractor=extractor, kid_subsets=5, kid_subset_size=4)
    same.add_real(batch.image, batch)
    same.add_generated(batch.image, batch)
    res_same = same.compute()
    assert res_same["FID"] == pytest.approx(0.0, abs=1e-6) and res_same["FID-H"] == pytest.approx(0.0, abs=1e-6)
    assert res_same["num_real"] == 6 and res_same["num_generated_hands"] == 12

    other = GenerationEvaluator(feature_extractor=extractor, kid_subsets=5, kid_subset_size=4)
    other.add_real(batch.image, batch)
    other.add_generated(batch.image * 0.3, batch)  # darker "generated" images
    res_other = other.compute()
    assert res_other["FID"] > 1e-3 and res_other["FID-H"] > 1e-3 and res_other["KID"] > res_same["KID"] + 1e-3

    with pytest.raises(ValueError, match=r"images: values in \[-1.00"):
        other.add_generated(batch.image * 2 - 1, batch)


def test_mediapipe_missing_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_mediapipe(name, *args, **kwargs):
        if name == "mediapipe" or name.startswith("mediapipe."):
            raise ImportError("No module named 'mediapipe'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mediapipe)
    with pytest.raises(ImportError, match=r"optional extra 'mediapipe'.*attentionhand-aug\[mediapipe\]"):
        genmetrics.MediaPipeHands()


def test_detections_are_matched_to_the_labelled_hands_by_position():
    batch = make_batch(["interacting", "right"], size=32)
    batch.right.joints_img = 8 + 4 * torch.rand(2, 21, 2)  # the hands apart in the image
    batch.left.joints_img = 20 + 4 * torch.rand(2, 21, 2)
    gt = torch.stack([batch.right.joints_img, batch.left.joints_img], 1)  # (B, 2, 21, 2)

    def swapped_detector(images):  # right and left swapped (wrong handedness), 5 px off
        return HandKeypoints2D(keypoints_img=gt.flip(1) + torch.tensor([3.0, 4.0]), confidence=torch.tensor([[0.6, 0.9], [0.0, 0.7]]))

    res = {}
    for match in (True, False):
        evaluator = GenerationEvaluator(feature_extractor=TinyCNN().eval(), keypoint_detector=swapped_detector, match_sides=match)
        evaluator.add_generated(batch.image, batch)
        res[match] = evaluator.compute()
    # matched: sample 0's two detections swap back; sample 1's single (left-labelled) detection is its right hand
    assert res[True]["MSE-2D"] == pytest.approx(25.0, rel=1e-6)
    assert res[True]["HandConf-labelled"] == pytest.approx((0.9 + 0.6 + 0.7) / 3)
    assert res[False]["MSE-2D"] > 100.0
    assert res[False]["HandConf-labelled"] == pytest.approx((0.6 + 0.9 + 0.0) / 3)
    assert res[True]["HandConf"] == res[False]["HandConf"] == pytest.approx((0.6 + 0.9 + 0.7) / 3)


def test_silhouette_score_is_averaged_over_generated_images():
    """The evaluator averages the scorer's per-image values ("SilhouetteIoU"); NaN without a scorer."""
    batch = make_batch(["interacting"] * 4, size=32)
    calls = []

    def scorer(images, labels):
        calls.append((images.shape[0], len(labels)))
        return torch.tensor([1.0, 0.5, 0.0, 0.5])[: images.shape[0]]

    ev = GenerationEvaluator(feature_extractor=TinyCNN().eval(), kid_subsets=2, kid_subset_size=2,
                             silhouette_scorer=scorer)
    ev.add_generated(batch.image, batch)
    ev.add_generated(batch.image[:2], batch.select(slice(0, 2)))
    res = ev.compute()
    assert calls[0] == (4, 4)
    assert res["SilhouetteIoU"] == pytest.approx((2.0 + 1.5) / 6)
    plain = GenerationEvaluator(feature_extractor=TinyCNN().eval())
    plain.add_generated(batch.image, batch)
    assert math.isnan(plain.compute()["SilhouetteIoU"])


def _fake_mediapipe(monkeypatch, per_image):
    """A stand-in `mediapipe` module whose Hands.process returns, for the k-th image, MediaPipe's result objects
    (multi_hand_landmarks[i].landmark[j].x/.y normalised, multi_handedness[i].classification[0].label/.score)
    built from per_image[k] = [(label, score, (x0, y0, x1, y1) normalised box of the 21 landmarks), ...]."""
    import sys
    import types

    calls = {"n": 0, "init": []}

    def landmarks(box):
        x0, y0, x1, y1 = box
        pts = [types.SimpleNamespace(x=x0 + (x1 - x0) * (j % 5) / 4, y=y0 + (y1 - y0) * (j // 5) / 4) for j in range(21)]
        pts[-1] = types.SimpleNamespace(x=x1, y=y1)
        return types.SimpleNamespace(landmark=pts)

    class Hands:
        def __init__(self, **kwargs):
            calls["init"].append(kwargs)

        def process(self, array):
            hands = per_image[calls["n"] % len(per_image)]
            calls["n"] += 1
            if not hands:
                return types.SimpleNamespace(multi_hand_landmarks=None, multi_handedness=None)
            return types.SimpleNamespace(
                multi_hand_landmarks=[landmarks(box) for _, _, box in hands],
                multi_handedness=[types.SimpleNamespace(classification=[types.SimpleNamespace(label=label, score=score)])
                                  for label, score, _ in hands])

    module = types.ModuleType("mediapipe")
    module.solutions = types.SimpleNamespace(hands=types.SimpleNamespace(Hands=Hands))
    monkeypatch.setitem(sys.modules, "mediapipe", module)
    return calls


def test_hand_conf_is_hand1000s_handedness_mean_and_differs_from_the_labelled_one(monkeypatch):
    """Fixture: 3 images, each with two labelled hands. Image 0: MediaPipe finds two hands both called "Left"
    (0.8, 0.6); image 1: one hand (0.9); image 2: none. Hand1000 averages every detection's handedness score:
    (0.8 + 0.6 + 0.9) / 3; the labelled definition keeps one detection per side and counts misses as 0."""
    calls = _fake_mediapipe(monkeypatch, [
        [("Left", 0.8, (0.1, 0.1, 0.4, 0.5)), ("Left", 0.6, (0.5, 0.5, 0.9, 0.8))],
        [("Right", 0.9, (0.25, 0.25, 0.5, 0.75))],
        [],
    ])
    detector = genmetrics.MediaPipeHands()
    assert calls["init"][0]["min_detection_confidence"] == 0.0  # Hand1000's hand_confidence.py
    batch = make_batch(["interacting"] * 3, size=32)
    evaluator = GenerationEvaluator(feature_extractor=TinyCNN().eval(), keypoint_detector=detector)
    evaluator.add_generated(batch.image, batch)
    res = evaluator.compute()
    assert res["HandConf"] == pytest.approx((0.8 + 0.6 + 0.9) / 3)
    assert res["num_detected_hands"] == 3
    # one detection per side kept (image 0: the 0.8 "Left" = the right hand for unmirrored images), misses 0
    assert res["HandConf-labelled"] == pytest.approx((0.8 + 0.0 + 0.9 + 0.0 + 0.0 + 0.0) / 6)
    assert res["HandConf"] > 0.5 > res["HandConf-labelled"]


def test_landmark_crops_are_hand1000s_union_box_resized_and_centre_cropped(monkeypatch):
    _fake_mediapipe(monkeypatch, [
        [("Left", 0.8, (0.25, 0.25, 0.5, 0.5)), ("Right", 0.7, (0.5, 0.25, 0.75, 0.75))],  # union 16..48 x 16..48
        [],
    ])
    detector = genmetrics.MediaPipeHands(min_detection_confidence=0.5)
    images = torch.zeros(2, 3, 64, 64)
    images[0, :, 16:48, 16:48] = 1.0  # white inside the union box, black outside
    crops = genmetrics.landmark_crops(images, detector(images), size=8)
    assert crops.shape == (1, 3, 8, 8)  # image 1 has no detection: no crop
    assert torch.allclose(crops, torch.ones_like(crops))  # exactly the union box
    evaluator = GenerationEvaluator(feature_extractor=TinyCNN().eval(), landmark_detector=detector,
                                    kid_subsets=2, kid_subset_size=2)
    evaluator.add_real(images)
    evaluator.add_generated(images, make_batch(["interacting"] * 2, size=64))
    res = evaluator.compute()
    assert res["num_real_lm_crops"] == 1 and res["num_generated_lm_crops"] == 1
    assert math.isnan(res["FID-H(lm)"])  # fewer than 2 crops per set


def test_mse2d_from_mocked_mediapipe_landmarks_by_hand(monkeypatch):
    """MSE-2D through MediaPipeHands on mocked MediaPipe results. Image 0 (32 x 32 px) has one labelled hand, the
    right one; MediaPipe finds one hand labelled "Left" (= right in an unmirrored image) whose 21 landmarks lie
    on the grid x = 8 + 4 (j % 5), y = 8 + 4 (j // 5) px, except landmark 20 at (24, 24) (the fixture's box
    corner). The label's joints lie exactly on the grid, so only joint 20 is off: (16, 0) px -> 256 px^2; joint 3
    is not valid in the label. Image 1: nothing detected, adds nothing. MSE-2D = 256 / 20 valid joints = 12.8."""
    _fake_mediapipe(monkeypatch, [[("Left", 0.9, (0.25, 0.25, 0.75, 0.75))], []])
    batch = make_batch(["right", "right"], size=32)
    j = torch.arange(21)
    grid = torch.stack([8 + 4 * (j % 5), 8 + 4 * (j // 5)], -1).float()
    batch.right.joints_img = grid.expand(2, 21, 2).clone()
    batch.right.joints_valid = torch.ones(2, 21, dtype=torch.bool)
    batch.right.joints_valid[:, 3] = False
    res = {}
    for unit in ("px", "normalized"):
        evaluator = GenerationEvaluator(feature_extractor=TinyCNN().eval(), keypoint_detector=genmetrics.MediaPipeHands(),
                                        mse2d_unit=unit)
        evaluator.add_generated(batch.image, batch)
        res[unit] = evaluator.compute()
    assert res["px"]["MSE-2D"] == pytest.approx(256.0 / 20)
    assert res["normalized"]["MSE-2D"] == pytest.approx((16.0 / 32) ** 2 / 20)  # coordinates / image width
    assert res["px"]["num_detected_hands"] == 1

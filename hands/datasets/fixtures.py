"""Tiny datasets in each real on-disk layout, with the numbers they were made from (for tests and demos).

Every fixture is built from a hand model: world-frame MANO fits drawn at random (seeded), meshed by the
model, seen by cameras placed to keep both hands in view. Images are random noise (the readers never look
at pixel content). Each writer returns a ``truth`` dict holding what it wrote in the project's units
(metres), so a test can compare a reader's output with numbers it constructed itself.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from hands.datasets.layouts import IH26MWriter, save_image, write_hic_json, write_ply, write_reih_cameras, write_reih_frame
from hands.joints import IH26M_TO_OURS
from hands.rotation import matrix_to_axis_angle

__all__ = [
    "random_world_fit",
    "write_ih26m_fixture",
    "write_reih_fixture",
    "write_hic_fixture",
    "write_coco_fixture",
    "REIH_TEST_CAPTURE",
    "REIH_TRAIN_CAPTURE",
]

REIH_TEST_CAPTURE = "m--20221215--0949--RNS217--pilot--ProjectGoliathScript--Hands--two-hands"
REIH_TRAIN_CAPTURE = "m--20221111--1111--ABC123--pilot--ProjectGoliathScript--Hands--two-hands"


def _forward(model, side, pose, shape, trans):
    with torch.no_grad():
        out = model(side, torch.tensor(pose[None], dtype=torch.float32), torch.tensor(shape[None], dtype=torch.float32), torch.tensor(trans[None], dtype=torch.float32))
    return out.verts[0].double().numpy(), out.joints[0].double().numpy()


def random_world_fit(rng: np.random.Generator, model, side: str, centre: np.ndarray) -> dict:
    """A world-frame fit whose wrist lands near ``centre``: {pose (48,), shape (10,), trans (3,), verts
    (778, 3), joints (21, 3)} (metres, our joint order)."""
    from hands.datasets.poses import _random_rotation

    root = matrix_to_axis_angle(torch.tensor(_random_rotation(rng))).numpy()
    pose = np.concatenate([root, rng.normal(0.0, 0.25, size=45)])
    shape = rng.normal(0.0, 0.7, size=10)
    _, joints = _forward(model, side, pose, shape, np.zeros(3))
    trans = centre - joints[0] + rng.normal(0.0, 0.005, size=3)
    verts, joints = _forward(model, side, pose, shape, trans)
    return {"pose": pose, "shape": shape, "trans": trans, "verts": verts, "joints": joints}


def _look_at_camera(rng: np.random.Generator, target: np.ndarray, distance: float) -> tuple[np.ndarray, np.ndarray]:
    from hands.datasets.synthlab import look_at

    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    position = target + direction * distance
    return look_at(position, target, rng.uniform(-np.pi, np.pi)), position


def _noise_image(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    return rng.integers(0, 256, size=(size[0], size[1], 3), dtype=np.uint8)


def write_ih26m_fixture(
    root: Path,
    model,
    *,
    split: str = "test",
    frames: int = 2,
    cameras: int = 2,
    size: tuple[int, int] = (48, 64),
    seed: int = 0,
    null_fit: tuple[int, str] | None = None,
    invalid_joint: tuple[int, int] | None = None,
    human_annot_ids: list[int] | None = None,
    write_images: bool = True,
) -> dict:
    """InterHand2.6M's layout under ``root`` (annotations/{split}/..., images/{split}/...).

    Frame f holds two hands ("interacting") when f is even, a right hand only when odd. null_fit =
    (frame, side) writes a null MANO fit; invalid_joint = (frame, IH2.6M joint index) marks one joint
    invalid; human_annot_ids writes aid_human_annot_{split}.txt. Returns truth: {"frames": [{"fits":
    {side: fit or None}, "hand_type"}], "cameras": [{"R", "t", "K"}], "images": [{"aid", "frame", "camera"}]}.
    """
    rng = np.random.default_rng(seed)
    height, width = size
    writer = IH26MWriter(Path(root), split)
    truth = {"frames": [], "cameras": [], "images": []}
    focal = np.array([1.1 * width, 1.1 * width])
    princpt = np.array([(width - 1) / 2, (height - 1) / 2])
    for k in range(cameras):
        R, position = _look_at_camera(rng, np.zeros(3), 0.6)
        writer.add_camera(0, str(400000 + k), R, position, focal, princpt)
        K = np.array([[focal[0], 0, princpt[0]], [0, focal[1], princpt[1]], [0, 0, 1.0]])
        truth["cameras"].append({"R": R, "t": -R @ position, "K": K, "name": str(400000 + k)})
    for f in range(frames):
        sides = ("right", "left") if f % 2 == 0 else ("right",)
        fits = {"right": None, "left": None}
        joints_ih = np.zeros((42, 3))
        valid = np.zeros(42, dtype=int)
        for side in sides:
            centre = np.array([0.05 if side == "left" else -0.05, 0.0, 0.0])
            fits[side] = random_world_fit(rng, model, side, centre)
            offset = 0 if side == "right" else 21
            joints_ih[offset + np.array(IH26M_TO_OURS)] = fits[side]["joints"]
            valid[offset : offset + 21] = 1
        if invalid_joint is not None and invalid_joint[0] == f:
            valid[invalid_joint[1]] = 0
        written_fits = {s: (None if (fit is None or null_fit == (f, s)) else fit) for s, fit in fits.items()}
        writer.add_frame(0, f, joints_ih, valid, written_fits)
        hand_type = "interacting" if len(sides) == 2 else "right"
        truth["frames"].append({"fits": written_fits, "all_fits": fits, "hand_type": hand_type, "joints_ih": joints_ih, "valid": valid})
        for k in range(cameras):
            aid = writer.add_image(
                f"Capture0/ROM_seq/cam{400000 + k}/image{f:05d}.jpg",
                size=size,
                capture=0,
                camera=str(400000 + k),
                frame_idx=f,
                seq_name="ROM_seq",
                hand_type=hand_type,
                bbox_xywh=[1.0, 1.0, width - 3.0, height - 3.0],
                joint_valid=valid,
                image=_noise_image(rng, size) if write_images else None,
            )
            truth["images"].append({"aid": aid, "frame": f, "camera": k})
    writer.write()
    if human_annot_ids is not None:
        (Path(root) / f"aid_human_annot_{split}.txt").write_text("".join(f"{i}\n" for i in human_annot_ids))
    return truth


def reih_keypoints(joints_ours: np.ndarray) -> np.ndarray:
    """(21, 3) our order -> (24, 3) ReIH order; thumb 0 and pinky 0 are set between the wrist and the
    next joint, the forearm stub behind the wrist (values a reader must drop)."""
    from hands.datasets.reih import REIH_TO_OURS

    out = np.zeros((24, 3))
    out[list(REIH_TO_OURS)] = joints_ours
    out[1] = (joints_ours[0] + joints_ours[1]) / 2  # thumb 0
    out[18] = (joints_ours[0] + joints_ours[17]) / 2  # pinky 0
    out[23] = joints_ours[0] + (joints_ours[0] - joints_ours[9])  # forearm stub
    return out


def write_reih_fixture(
    root: Path,
    model,
    *,
    captures: tuple[str, ...] = (REIH_TEST_CAPTURE, REIH_TRAIN_CAPTURE),
    frames: tuple[int, ...] = (0, 6),
    cameras: int = 2,
    size: tuple[int, int] = (48, 64),
    seed: int = 0,
    ego: bool = True,
    write_images: bool = True,
) -> dict:
    """ReInterHand's layout under ``root``: per capture Mugsy_cameras (cam_params.json, envmap_per_frame
    images), Ego_cameras (fisheye, per-frame cam_params, truncation_ratio.json), frame_list.txt, orig_fits
    keypoints (24 per hand, mm) and mano_fits. Returns truth: {capture: {"frames": {frame: {side: fit}},
    "cameras": {name: {R, t, K}}, "ego": {frame: {R, t, K, D}}}}."""
    rng = np.random.default_rng(seed)
    height, width = size
    truth = {}
    focal = np.array([1.1 * width, 1.1 * width])
    princpt = np.array([(width - 1) / 2, (height - 1) / 2])
    K = np.array([[focal[0], 0, princpt[0]], [0, focal[1], princpt[1]], [0, 0, 1.0]])
    for capture in captures:
        folder = Path(root) / capture
        cams = {}
        for k in range(cameras):
            R, position = _look_at_camera(rng, np.zeros(3), 0.6)
            cams[f"4000{k:02d}"] = {"R": R, "t_m": -R @ position, "focal": focal, "princpt": princpt, "K": K}
        write_reih_cameras(folder, cams)
        entry = {"frames": {}, "cameras": cams, "ego": {}}
        ratios = {}
        for frame in frames:
            fits = {side: random_world_fit(rng, model, side, np.array([0.05 if side == "left" else -0.05, 0.0, 0.0])) for side in ("right", "left")}
            write_reih_frame(folder, frame, {s: reih_keypoints(f["joints"]) for s, f in fits.items()}, fits)
            entry["frames"][frame] = fits
            for name in cams:
                if write_images:
                    save_image(folder / "Mugsy_cameras" / "envmap_per_frame" / "images" / name / f"{frame:06d}.png", _noise_image(rng, size))
            if ego:
                R, position = _look_at_camera(rng, np.zeros(3), 0.5)
                D = rng.uniform(-0.05, 0.05, size=4)
                cam = {"R": R.tolist(), "t": (-R @ position * 1000.0).tolist(), "focal": focal.tolist(), "princpt": princpt.tolist(), "D": D.tolist()}
                path = folder / "Ego_cameras" / "envmap_per_frame" / "cam_params" / f"{frame:06d}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(cam))
                if write_images:
                    save_image(folder / "Ego_cameras" / "envmap_per_frame" / "images" / f"{frame:06d}.png", _noise_image(rng, size))
                entry["ego"][frame] = {"R": R, "t": -R @ position, "K": K, "D": D}
                ratios[f"{frame:06d}"] = 0.9
        if ego:
            (folder / "Ego_cameras" / "envmap_per_frame" / "truncation_ratio.json").write_text(json.dumps(ratios))
        (folder / "frame_list.txt").write_text("".join(f"seg {frame}\n" for frame in frames))
        truth[capture] = entry
    return truth


def write_hic_fixture(root: Path, model, *, count: int = 3, size: tuple[int, int] = (480, 640), seed: int = 0) -> dict:
    """HIC's layout under ``root``: HIC.json, images, .ply meshes (metres, camera space). Sample i is
    interacting when i % 3 == 0, right-only when 1, left-only when 2. Returns truth: {"meshes": [{side:
    verts or None}], "hand_type": [...]}. Meshes sit 0.5 m in front of HIC's fixed camera (focal 525,
    principal point (319.5, 239.5), so images are 640x480; they are flat grey to stay small)."""
    rng = np.random.default_rng(seed)
    height, width = size
    images, annotations, truth = [], [], {"meshes": [], "hand_type": []}
    faces = {side: model.faces_for(side).numpy() for side in ("right", "left")}
    for i in range(count):
        hand_type = ("interacting", "right", "left")[i % 3]
        sides = ("right", "left") if hand_type == "interacting" else (hand_type,)
        meshes = {"right": None, "left": None}
        ann = {"id": i, "image_id": i, "hand_type": hand_type, "right_mano_path": None, "left_mano_path": None}
        for side in sides:
            fit = random_world_fit(rng, model, side, np.array([0.04 if side == "left" else -0.04, 0.0, 0.5]))
            meshes[side] = fit["verts"]
            name = f"meshes/{i:04d}_{side}.ply"
            write_ply(Path(root) / name, fit["verts"], faces[side])
            ann[f"{side}_mano_path"] = name
        file_name = f"images/{i:04d}.png"
        save_image(Path(root) / file_name, np.full((height, width, 3), 90, dtype=np.uint8))
        images.append({"id": i, "file_name": file_name, "width": width, "height": height})
        annotations.append(ann)
        truth["meshes"].append(meshes)
        truth["hand_type"].append(hand_type)
    write_hic_json(Path(root), images, annotations)
    return truth


def _coco_hand(rng: np.random.Generator, model, side: str, centre: np.ndarray, focal: float, princpt: np.ndarray, size) -> dict:
    """A camera-space fit seen by a NeuralAnnot-style virtual camera, its keypoints (21 x (x, y, score)) and
    the box around them (x, y, w, h)."""
    fit = random_world_fit(rng, model, side, centre)
    uv = fit["joints"][:, :2] / fit["joints"][:, 2:] * focal + princpt
    score = rng.uniform(0.3, 1.0, size=21)
    score[rng.integers(1, 21)] = 0.0  # one keypoint unlabelled
    kpts = np.concatenate([uv, score[:, None]], 1)
    lo, hi = uv.min(0) - 2.0, uv.max(0) + 2.0
    return {
        "fit": fit,
        "cam": {"focal": [focal, focal], "princpt": princpt.tolist()},
        "kpts": kpts,
        "box": [float(lo[0]), float(lo[1]), float(hi[0] - lo[0]), float(hi[1] - lo[1])],
    }


def _with_extrinsics(rng: np.random.Generator, model, side: str, entry: dict) -> dict:
    """A camera-space NeuralAnnot entry rewritten as a world-frame fit plus cam_param R, t (metres) that bring
    it back: the same mesh for a reader that applies them (InterWild's get_mano_data does)."""
    from hands.datasets.mano_fit import fit_to_camera
    from hands.datasets.poses import _random_rotation

    R = _random_rotation(rng)
    t = rng.normal(0.0, 0.3, size=3)
    f = lambda x: torch.tensor(np.asarray(x)[None], dtype=torch.float64)  # noqa: E731
    inv_R, inv_t = f(R.T), f(-R.T @ t)
    pose, trans = fit_to_camera(model, side, f(entry["mano_param"]["pose"]).float(), f(entry["mano_param"]["shape"]).float(),
                                f(entry["mano_param"]["trans"]).float(), inv_R.float(), inv_t.float())
    mano_param = {"pose": pose[0].tolist(), "shape": entry["mano_param"]["shape"], "trans": trans[0].tolist()}
    return {"mano_param": mano_param, "cam_param": dict(entry["cam_param"], R=R.tolist(), t=t.tolist())}


def write_coco_fixture(root: Path, model, *, size: tuple[int, int] = (60, 80), seed: int = 0) -> dict:
    """InterWild's MSCOCO layout under ``root``: annotations/coco_wholebody_{train,val}_v1.0.json,
    annotations/MSCOCO_train_MANO_NeuralAnnot.json, images/{train2017,val2017}/*.jpg.

    train2017: image 1 holds one person (aid 11: both hands with fits, the left fitted with another virtual
    camera); image 2 holds two people (aid 21: right hand only, no fit entry at all; aid 22: both hands, the
    left side's fit null and the right's fit broken, a 47-value pose); image 3 holds one person whose hand
    box lies outside the image (aid 31: left hand with keypoints only, a valid right hand whose fit is written in
    a world frame with ``R``, ``t`` in its cam_param); image 4
    holds the bad or filtered records: aid 40 iscrowd, 41 no body keypoints, 42 neither hand valid, 43 an image_id not
    among the images, 44 a NaN in its person box, 45 no ``righthand_kpts``, 46 a person box outside the
    image. val2017: aid 91 (both hands, 2D only).

    Returns truth: {"train": {aid: {"image_id", "file", "size", "boxes" {side: xyxy or None}, "kpts" {side:
    (21, 3)}, "fits" {side: {pose, shape, trans, verts, joints, focal, princpt} or None}}}, "val": {...},
    "skipped_train": {aid: reason substring}, "persons": {image_id: count}}.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    height, width = size
    princpt = np.array([(width - 1) / 2, (height - 1) / 2])
    truth: dict = {"train": {}, "val": {}, "skipped_train": {}, "persons": {}}

    def person(aid, image_id, sides, *, cams=None, fit_sides=None, file="", split="train"):
        cams = cams or {}
        ann = {
            "id": aid, "image_id": image_id, "category_id": 1, "iscrowd": 0, "num_keypoints": 10,
            "bbox": [2.0, 2.0, width - 6.0, height - 6.0], "area": 100.0,
            "lefthand_valid": False, "righthand_valid": False,
            "lefthand_box": [0.0, 0.0, 0.0, 0.0], "righthand_box": [0.0, 0.0, 0.0, 0.0],
            "lefthand_kpts": [0.0] * 63, "righthand_kpts": [0.0] * 63,
        }
        entry = {"image_id": image_id, "file": file, "size": size, "boxes": {"right": None, "left": None},
                 "kpts": {"right": np.zeros((21, 3)), "left": np.zeros((21, 3))}, "fits": {"right": None, "left": None}}
        fits = {}
        for side in sides:
            focal = cams.get(side, 16.0 * width)  # NeuralAnnot's virtual cameras are long (focal 5000 px on a crop)
            centre = np.array([0.04 if side == "left" else -0.04, 0.0, 8.0])
            hand = _coco_hand(rng, model, side, centre, focal, princpt, size)
            prefix = "righthand" if side == "right" else "lefthand"
            ann[f"{prefix}_valid"] = True
            ann[f"{prefix}_box"] = hand["box"]
            ann[f"{prefix}_kpts"] = hand["kpts"].reshape(-1).tolist()
            x, y, w, h = hand["box"]
            x1, y1 = max(0.0, x), max(0.0, y)
            x2, y2 = min(width - 1.0, x1 + max(0.0, w - 1.0)), min(height - 1.0, y1 + max(0.0, h - 1.0))
            entry["boxes"][side] = np.array([x1, y1, x2, y2]) if (w * h > 0 and x2 > x1 and y2 > y1) else None
            entry["kpts"][side] = hand["kpts"]
            if fit_sides is None or side in fit_sides:
                fits[side] = {"mano_param": {k: hand["fit"][k].tolist() for k in ("pose", "shape", "trans")}, "cam_param": hand["cam"]}
                entry["fits"][side] = dict(hand["fit"], focal=np.array(hand["cam"]["focal"]), princpt=np.array(hand["cam"]["princpt"]))
        truth[split][aid] = entry
        return ann, fits

    train_images, train_anns, mano = [], [], {}
    for image_id in (1, 2, 3, 4):
        file = f"{image_id:012d}.jpg"
        train_images.append({"id": image_id, "file_name": file, "width": width, "height": height})
        save_image(root / "images" / "train2017" / file, _noise_image(rng, size))
    ann, fits = person(11, 1, ("right", "left"), cams={"left": 20.0 * width}, file="000000000001.jpg")
    train_anns.append(ann), mano.update({"11": fits})
    ann, _ = person(21, 2, ("right",), fit_sides=(), file="000000000002.jpg")  # no NeuralAnnot entry at all
    train_anns.append(ann)
    ann, fits = person(22, 2, ("right", "left"), fit_sides=(), file="000000000002.jpg")
    right = _coco_hand(rng, model, "right", np.array([-0.04, 0.0, 8.0]), 16.0 * width, princpt, size)
    pose = right["fit"]["pose"].tolist()[:47]
    mano["22"] = {"right": {"mano_param": {"pose": pose, "shape": right["fit"]["shape"].tolist(), "trans": right["fit"]["trans"].tolist()},
                            "cam_param": right["cam"]}, "left": None}
    train_anns.append(ann)
    ann, fits = person(31, 3, ("right", "left"), fit_sides=("right",), file="000000000003.jpg")
    ann["lefthand_box"] = [width + 5.0, 3.0, 10.0, 10.0]  # outside the image: sanitised away, keypoints stay
    truth["train"][31]["boxes"]["left"] = None
    fits["right"] = _with_extrinsics(rng, model, "right", fits["right"])  # a world fit with R, t in cam_param
    train_anns.append(ann), mano.update({"31": fits})
    for aid, change, reason in (
        (40, {"iscrowd": 1}, "crowd"),
        (41, {"num_keypoints": 0}, "crowd or no body keypoints"),
        (42, {"righthand_valid": False}, "neither hand valid"),
        (43, {"image_id": 999}, "image_id not among the images"),
        (44, {"bbox": [float("nan"), 1.0, 5.0, 5.0]}, "bbox: NaN or inf"),
        (45, {"righthand_kpts": None}, "missing key 'righthand_kpts'"),
        (46, {"bbox": [width + 10.0, 2.0, 5.0, 5.0]}, "person box empty"),
    ):
        bad, _ = person(aid, 4, ("right",), file="000000000004.jpg")
        del truth["train"][aid]
        bad.update(change)
        if change.get("righthand_kpts", 0) is None:
            del bad["righthand_kpts"]
        train_anns.append(bad)
        truth["skipped_train"][aid] = reason
    truth["persons"] = {1: 1, 2: 2, 3: 1, 4: 6, 999: 1}
    val_file = "000000000091.jpg"
    save_image(root / "images" / "val2017" / val_file, _noise_image(rng, size))
    val_ann, _ = person(91, 91, ("right", "left"), file=val_file, split="val")
    for entry in truth["val"].values():
        entry["fits"] = {"right": None, "left": None}
    annotations = root / "annotations"
    annotations.mkdir(parents=True, exist_ok=True)
    categories = [{"id": 1, "name": "person"}]
    (annotations / "coco_wholebody_train_v1.0.json").write_text(
        json.dumps({"images": train_images, "annotations": train_anns, "categories": categories})
    )
    (annotations / "coco_wholebody_val_v1.0.json").write_text(json.dumps({
        "images": [{"id": 91, "file_name": val_file, "width": width, "height": height}], "annotations": [val_ann], "categories": categories
    }))
    (annotations / "MSCOCO_train_MANO_NeuralAnnot.json").write_text(json.dumps(mano))
    return truth

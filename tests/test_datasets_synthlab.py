"""synthlab: written in IH2.6M's layout, read back by the IH2.6M reader, deterministic, atomic on first use."""
from __future__ import annotations

import json

import pytest
import torch

from hands.datasets import DatasetError, build_dataset
from hands.datasets import synthlab as synthlab_module
from hands.datasets.synthlab import FORMAT_VERSION, SCENES, SPLITS, ensure_synthlab, main, write_synthlab
from hands.render import render_hands

TINY = {"train-lab": 4, "test-lab": 2, "train-wild": 4, "test-wild": 2}


@pytest.fixture(scope="module")
def model():
    from hands.mano import HandModel

    return HandModel()


@pytest.fixture(scope="module")
def synthlab(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("synthlab")
    write_synthlab(root, seed=3, sizes=TINY, resolution=64, hand_model=model, show_progress=False)
    return root


def test_layout_is_interhand26m(synthlab):
    for split in SPLITS:
        for name in ("data", "camera", "joint_3d", "MANO_NeuralAnnot"):
            assert (synthlab / "annotations" / split / f"InterHand2.6M_{split}_{name}.json").is_file()
        captions = json.loads((synthlab / "captions" / f"{split}.json").read_text())
        assert len(captions) == TINY[split]
    info = json.loads((synthlab / "synthlab.json").read_text())
    assert info["sizes"] == TINY and info["resolution"] == 64 and info["hand_model_procedural"]


def test_round_trip_labels_match_the_images(synthlab, model):
    for split in SPLITS:
        dataset = build_dataset("synthlab", synthlab, split, hand_model=model)
        assert len(dataset) == TINY[split] and not dataset.skipped
        for index in range(len(dataset)):
            sample = dataset[index]
            sample.validate()
            assert sample.meta["dataset"] == "synthlab" and sample.image_size == (64, 64)
            assert "hand" in sample.meta["prompt"]
            if split.endswith("wild"):
                assert any(phrase in sample.meta["prompt"] for _, phrase in SCENES.values())
            valid = [bool(sample.right.valid), bool(sample.left.valid)]
            assert any(valid) and (sample.hand_type == "interacting") == all(valid)
            for side in ("right", "left"):
                hand = sample.hand(side)
                if bool(hand.valid):
                    assert bool(hand.mano_valid) and bool(hand.joints_valid.all())
                    # the MANO joints of the mesh agree with the annotated 3D joints (written from the same fit)
                    regressed = model.j_regressor_for(side) @ hand.verts_cam
                    assert torch.allclose(regressed[0], hand.joints_cam[0], atol=1e-4)
            # the labels re-render onto the hands: lab images are bright where the mesh is, dark elsewhere
            out = render_hands(
                sample.right.verts_cam[None], sample.left.verts_cam[None], model.faces_for("right"), model.faces_for("left"),
                sample.camera.K[None], (64, 64), right_valid=sample.right.valid[None], left_valid=sample.left.valid[None],
            )
            mask = out.mask[0]
            assert mask.sum() > 30
            if split.endswith("lab"):
                brightness = sample.image.mean(0)
                assert brightness[mask].mean() > brightness[~mask].mean() + 0.2


def test_the_ih26m_reader_reads_synthlab(synthlab, model):
    dataset = build_dataset("ih26m", synthlab, "test-wild", hand_model=model)
    assert len(dataset) == 2 and dataset[0].meta["dataset"] == "ih26m"


def test_deterministic_by_seed(synthlab, tmp_path, model):
    write_synthlab(tmp_path, seed=3, sizes={"train-lab": 0, "test-lab": 2, "train-wild": 0, "test-wild": 0}, resolution=64, hand_model=model, show_progress=False)
    for name in ("data", "joint_3d", "MANO_NeuralAnnot", "camera"):
        path = f"annotations/test-lab/InterHand2.6M_test-lab_{name}.json"
        assert (tmp_path / path).read_bytes() == (synthlab / path).read_bytes()
    for image in (synthlab / "images" / "test-lab").rglob("*.jpg"):
        assert (tmp_path / image.relative_to(synthlab)).read_bytes() == image.read_bytes()
    other = tmp_path / "other"
    write_synthlab(other, seed=4, sizes={"train-lab": 0, "test-lab": 2, "train-wild": 0, "test-wild": 0}, resolution=64, hand_model=model, show_progress=False)
    path = "annotations/test-lab/InterHand2.6M_test-lab_MANO_NeuralAnnot.json"
    assert (other / path).read_bytes() != (synthlab / path).read_bytes()


def test_ensure_synthlab_writes_once_into_the_cache(tmp_path, monkeypatch, model):
    monkeypatch.setenv("ATTENTIONHAND_CACHE", str(tmp_path / "cache"))
    sizes = {"train-lab": 1, "test-lab": 1, "train-wild": 0, "test-wild": 0}
    root = ensure_synthlab(sizes=sizes, resolution=48, hand_model=model, show_progress=False)
    assert root.parent == tmp_path / "cache" / "synthlab"
    assert root.name.startswith(f"{model.fingerprint()[:16]}-v{FORMAT_VERSION}-")
    assert (root / "synthlab.json").is_file()
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".synthlab-")]  # no temp folder left
    stamp = (root / "synthlab.json").stat().st_mtime_ns
    assert ensure_synthlab(sizes=sizes, resolution=48, hand_model=model) == root
    assert (root / "synthlab.json").stat().st_mtime_ns == stamp
    # the reader with root None asks for the default sizes (here made tiny): the same cache
    monkeypatch.setattr(synthlab_module, "DEFAULT_SIZES", sizes)
    monkeypatch.setattr(synthlab_module, "DEFAULT_RESOLUTION", 48)
    dataset = build_dataset("synthlab", None, "test-lab", hand_model=model)  # root None: the cached one
    assert dataset.root == root and len(dataset) == 1
    assert (root / "synthlab.json").stat().st_mtime_ns == stamp
    broken = tmp_path / "broken"
    (broken / "annotations").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no synthlab.json"):
        ensure_synthlab(broken)


def test_other_sizes_get_their_own_cache_folder_and_a_mismatched_stamp_is_rebuilt(tmp_path, monkeypatch, model):
    monkeypatch.setenv("ATTENTIONHAND_CACHE", str(tmp_path / "cache"))
    small = {"train-lab": 1, "test-lab": 1, "train-wild": 0, "test-wild": 0}
    root = ensure_synthlab(sizes=small, resolution=48, hand_model=model, show_progress=False)
    files = sorted(p.relative_to(root) for p in root.rglob("*"))
    stamp = (root / "synthlab.json").stat().st_mtime_ns
    larger = {**small, "test-lab": 2}
    other = ensure_synthlab(sizes=larger, resolution=48, hand_model=model, show_progress=False)
    # another folder: a process still reading the small one keeps every file of it
    assert other != root and other.parent == root.parent
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == files
    assert (root / "synthlab.json").stat().st_mtime_ns == stamp
    info = json.loads((other / "synthlab.json").read_text())
    assert info["sizes"] == larger and info["format_version"] == FORMAT_VERSION
    assert len(build_dataset("synthlab", other, "test-lab", hand_model=model)) == 2
    assert ensure_synthlab(sizes=small, resolution=48, hand_model=model) == root  # read again, not rewritten
    # a stamp that does not match its folder (an older format version written into it): written again
    (other / "synthlab.json").write_text(json.dumps({**info, "format_version": FORMAT_VERSION - 1}))
    assert ensure_synthlab(sizes=larger, resolution=48, hand_model=model, show_progress=False) == other
    assert json.loads((other / "synthlab.json").read_text())["format_version"] == FORMAT_VERSION
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".synthlab-")]  # nothing left aside
    # a folder the caller names is the caller's: returned as it is, whatever its sizes
    assert ensure_synthlab(other, sizes=small, resolution=48, hand_model=model) == other
    assert json.loads((other / "synthlab.json").read_text())["sizes"] == larger


def test_cli_and_model_mismatch(tmp_path, model):
    assert main(["--out", str(tmp_path / "cli"), "--sizes", "1", "0", "0", "0", "--resolution", "48"]) == 0
    info = json.loads((tmp_path / "cli" / "synthlab.json").read_text())
    assert info["sizes"]["train-lab"] == 1 and info["resolution"] == 48
    info["hand_model_fingerprint"] = "0" * 64
    (tmp_path / "cli" / "synthlab.json").write_text(json.dumps(info))
    dataset = build_dataset("synthlab", tmp_path / "cli", "train-lab", hand_model=model)
    with pytest.raises(DatasetError, match="another hand model"):
        dataset[0]
    with pytest.raises(ValueError, match="train-lab, test-lab, train-wild, test-wild"):
        build_dataset("synthlab", tmp_path / "cli", "train")


def test_pose_sampler_curls_to_the_palm_and_keeps_hands_apart(model):
    import numpy as np

    from hands.datasets.poses import PoseSampler

    sampler = PoseSampler(model)
    rng = np.random.default_rng(0)
    for side in ("right", "left"):
        shape = np.zeros(10)
        tips = {}
        for gesture in ("open", "fist"):
            fingers, _ = sampler.articulation(side, rng, gesture)
            _, joints = sampler.forward(side, np.concatenate([np.zeros(3), fingers])[None], shape[None])
            centre, _ = sampler.palm_frame(joints[0])
            normal = sampler.palm_normal(joints[0], side)
            tips[gesture] = joints[0, [8, 12, 16, 20]]
            heights = (tips[gesture] - centre) @ normal  # fingertips above the palm (towards its inside)
            if gesture == "fist":
                assert (heights > 0.0).all()  # on the palm side of the palm plane
        # a fist brings the four fingertips much closer to the wrist than an open hand
        wrist = joints[0, 0]
        assert np.linalg.norm(tips["fist"] - wrist, axis=1).mean() < 0.7 * np.linalg.norm(tips["open"] - wrist, axis=1).mean()
    for config in ("facing", "near"):
        _, fits = sampler.sample_frame(rng, config)
        right, left = fits["right"], fits["left"]
        verts_right, _ = sampler.forward("right", right.pose[None], right.shape[None], right.trans[None])
        verts_left, _ = sampler.forward("left", left.pose[None], left.shape[None], left.trans[None])
        gap = torch.cdist(torch.from_numpy(verts_right[0]), torch.from_numpy(verts_left[0])).min()
        assert gap >= 0.004 - 1e-6


def _camera_frame_hands(sampler, viewpoints, frames, seed=0):
    """Wrist-relative joints (N, 21, 3) of every hand of ``frames`` sampled frames, in the cameras of a rig."""
    import numpy as np

    rng = np.random.default_rng(seed)
    hands = []
    for _ in range(frames):
        cam = synthlab_module.random_rig(rng, 256, 1, viewpoints)[0]
        _, fits = sampler.sample_frame(rng)
        for side, fit in fits.items():
            if fit is not None:
                _, joints = sampler.forward(side, fit.pose[None], fit.shape[None], fit.trans[None])
                hands.append((joints[0] - joints[0, :1]) @ cam["R"].T)
    return np.stack(hands)


def test_studio_viewpoints_show_upright_hands_whose_mean_is_a_hand(model):
    import numpy as np

    from hands.datasets.poses import PoseSampler

    # sphere (the default): any orientation in the camera frame, so the data's mean hand collapses to near a point
    sphere = _camera_frame_hands(PoseSampler(model), "sphere", 60)
    # studio: upright hands before front cameras with little roll: the middle knuckle is above the wrist in the
    # image (camera -y) for most hands, and the mean hand keeps most of a hand's wrist-to-knuckle length
    studio = _camera_frame_hands(PoseSampler(model, orientation="upright"), "studio", 60)
    bone = np.linalg.norm(studio[:, 9], axis=1).mean()
    up_sphere, up_studio = (sphere[:, 9, 1] < 0).mean(), (studio[:, 9, 1] < 0).mean()
    assert 0.35 < up_sphere < 0.65 and up_studio > 0.9
    assert np.linalg.norm(sphere[:, 9].mean(0)) < 0.2 * bone
    assert np.linalg.norm(studio[:, 9].mean(0)) > 0.6 * bone


def test_upright_frames_point_the_fingers_up_and_the_palms_outward_mirrored_for_the_left_hand(model):
    import numpy as np

    from hands.datasets.poses import PoseSampler

    sampler = PoseSampler(model, orientation="upright")
    mirror = np.diag([-1.0, 1.0, 1.0])
    np.testing.assert_allclose(sampler.upright["left"], mirror @ sampler.upright["right"] @ mirror, atol=1e-9)
    for side, palm_x in (("right", 1.0), ("left", -1.0)):
        frame = sampler.upright[side]
        np.testing.assert_allclose(frame @ frame.T, np.eye(3), atol=1e-9)
        assert np.linalg.det(frame) == pytest.approx(1.0)
        _, joints = sampler.forward(side, np.zeros((1, 48)), np.zeros((1, 10)))
        up = frame @ (joints[0, 9] - joints[0, 0])
        normal = frame @ sampler.palm_normal(joints[0], side)
        assert up[2] > 0.95 * np.linalg.norm(up)  # wrist -> middle knuckle along world +z
        assert normal[0] == pytest.approx(palm_x, abs=1e-6)  # the palm faces outward: +x right, -x left
    with pytest.raises(ValueError, match="PoseSampler: unknown orientation 'sideways'; known: uniform, upright"):
        PoseSampler(model, orientation="sideways")


def test_default_viewpoints_draw_what_the_writers_before_the_option_drew(model):
    """The sphere default's random stream is unchanged by the studio option: values drawn by commit b4a2e0c."""
    import numpy as np

    from hands.datasets.poses import PoseSampler

    cam = synthlab_module.random_rig(np.random.default_rng(0), 256, 2)[1]
    np.testing.assert_allclose(cam["R"], [[-0.29782133, -0.63289476, 0.71466543], [0.34265282, -0.76962109, -0.53876936],
                                          [0.89100589, 0.08442512, 0.44607275]], atol=1e-7)
    np.testing.assert_allclose(cam["position"], [-0.43385739, -0.04082715, -0.23249055], atol=1e-7)
    config, fits = PoseSampler(model).sample_frame(np.random.default_rng(0))
    assert config == "single-right" and fits["left"] is None
    np.testing.assert_allclose(fits["right"].pose[:6], [0.65298897, -2.21803223, -0.88032678, 0.0, 0.18158946, -0.25],
                               atol=1e-7)
    with pytest.raises(ValueError, match="synthlab: unknown viewpoints 'Studio'; known: sphere, studio"):
        synthlab_module.random_rig(np.random.default_rng(0), 256, 1, "Studio")


def test_studio_synthlab_is_recorded_and_cached_apart_from_the_default(tmp_path, monkeypatch, model, capsys):
    from hands.datasets.synthlab import cache_folder_name, cache_stamp

    # the default's stamp (and cache folder) is that of the writers before the option existed
    assert set(cache_stamp({})) == {"format_version", "seed", "sizes", "resolution"}
    assert cache_stamp({"viewpoints": "sphere"}) == cache_stamp({})
    assert cache_folder_name(model.fingerprint(), {"viewpoints": "studio"}) != cache_folder_name(model.fingerprint(), {})
    monkeypatch.setenv("ATTENTIONHAND_CACHE", str(tmp_path / "cache"))
    sizes = {"train-lab": 2, "test-lab": 0, "train-wild": 0, "test-wild": 0}
    studio = ensure_synthlab(sizes=sizes, resolution=48, hand_model=model, show_progress=False, viewpoints="studio")
    assert json.loads((studio / "synthlab.json").read_text())["viewpoints"] == "studio"
    assert ensure_synthlab(sizes=sizes, resolution=48, hand_model=model, viewpoints="studio") == studio  # cached
    assert ensure_synthlab(sizes=sizes, resolution=48, hand_model=model, show_progress=False) != studio
    assert len(build_dataset("synthlab", studio, "train-lab", hand_model=model)) == 2
    with pytest.raises(ValueError, match="unknown viewpoints 'dome'"):
        write_synthlab(tmp_path / "bad", sizes=sizes, hand_model=model, viewpoints="dome")
    with pytest.raises(SystemExit) as info:
        main(["--out", str(tmp_path / "cli"), "--viewpoints", "dome"])
    assert info.value.code == 2 and "argument --viewpoints: invalid choice: 'dome'" in capsys.readouterr().err

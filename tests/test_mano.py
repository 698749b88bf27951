"""HandModel: loading through smplx, conventions, the chumpy-free loader and its errors."""
from __future__ import annotations

import hashlib
import pickle
import shutil
import sys
import types

import numpy as np
import pytest
import torch

from hands.mano import HandModel, load_mano_file
from hands.procedural import write_procedural_mano
from hands.rotation import mirror_axis_angle


@pytest.fixture(scope="module")
def mano_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mano")
    write_procedural_mano(folder)
    return folder


@pytest.fixture(scope="module")
def model(mano_dir):
    return HandModel(mano_dir)


def _random_params(batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 0.4 * torch.randn(batch, 48, generator=g), torch.randn(batch, 10, generator=g)


def test_outputs_have_manos_shapes_and_match_smplx_directly(model, mano_dir):
    import smplx

    pose, shape = _random_params()
    out = model("right", pose, shape)
    assert out.verts.shape == (3, 778, 3) and out.joints.shape == (3, 21, 3)
    assert model.faces.shape == (1538, 3) and model.faces.dtype == torch.long
    assert model.j_regressor.shape == (16, 778) and model.tip_verts.shape == (5,)
    assert model.is_procedural
    # smplx reads the procedural files with its own loader (plain pickles) and agrees with HandModel
    layer = smplx.MANO(str(mano_dir), is_rhand=True, use_pca=False, flat_hand_mean=False)
    ref = layer(betas=shape, global_orient=pose[:, :3], hand_pose=pose[:, 3:])
    torch.testing.assert_close(out.verts, ref.vertices)
    files = (mano_dir / "MANO_RIGHT.pkl").read_bytes() + (mano_dir / "MANO_LEFT.pkl").read_bytes()
    assert model.fingerprint() == hashlib.sha256(files).hexdigest()


def test_joints_are_in_our_order(model):
    pose, shape = _random_params(2)
    out = model("right", pose, shape)
    for k, joint in enumerate((4, 8, 12, 16, 20)):  # tips: thumb, index, middle, ring, pinky
        torch.testing.assert_close(out.joints[:, joint], out.verts[:, model.tip_verts[k]])
    # joint 0 is the posed wrist: the regressor's row 0 on the shaped template (the root turns about it)
    rest = model("right", torch.zeros(2, 48), shape)
    torch.testing.assert_close(out.joints[:, 0], rest.joints[:, 0])
    # our index knuckle (5) is MANO's joint 1; middle knuckle (9) MANO's 4; thumb knuckle (1) MANO's 13
    layer_joints = model.layers["right"](betas=shape, global_orient=pose[:, :3], hand_pose=pose[:, 3:]).joints
    for ours, mano in ((5, 1), (9, 4), (13, 10), (17, 7), (1, 13)):
        torch.testing.assert_close(out.joints[:, ours], layer_joints[:, mano])


def test_left_is_the_mirror_of_right(model):
    pose, shape = _random_params(4, seed=1)
    right = model("right", pose, shape)
    left = model("left", mirror_axis_angle(pose), shape)
    mirror = torch.tensor([-1.0, 1.0, 1.0])
    torch.testing.assert_close(left.verts, right.verts * mirror, atol=1e-6, rtol=0)
    torch.testing.assert_close(left.joints, right.joints * mirror, atol=1e-6, rtol=0)
    assert not model.left_shapedirs_fixed  # the procedural left file is already right


def test_bending_the_index_moves_its_tip_and_not_the_pinky(model):
    shape = torch.zeros(1, 10)
    rest = model("right", torch.zeros(1, 48), shape)
    pose = torch.zeros(1, 48)
    pose[0, 3:12] = torch.tensor([0.0, 0.0, 0.5] * 3)  # index joints 1-3 flexed about +z
    bent = model("right", pose, shape)
    index_tip, pinky_tip = 8, 20
    moved = (bent.joints[0] - rest.joints[0]).norm(dim=-1)
    assert moved[index_tip] > 0.04
    assert moved[pinky_tip] < 1e-7
    # flexion curls the index towards the palm (-y in the template frame)
    assert bent.joints[0, index_tip, 1] < rest.joints[0, index_tip, 1] - 0.03
    # a fist moves every fingertip
    fist = torch.zeros(1, 48)
    fist[0, 3:39] = torch.tensor([0.0, 0.0, 1.3] * 12)
    tips = (model("right", fist, shape).joints[0] - rest.joints[0]).norm(dim=-1)[[8, 12, 16, 20]]
    assert (tips > 0.04).all()


def test_trans_is_added_after_posing(model):
    pose, shape = _random_params(2, seed=2)
    trans = torch.tensor([[0.1, -0.2, 0.5], [0.0, 0.0, 1.0]])
    moved, still = model("right", pose, shape, trans), model("right", pose, shape)
    torch.testing.assert_close(moved.verts, still.verts + trans[:, None])
    # the wrist is not at the origin of the template: the posed wrist is J_wrist(shape) + trans
    assert still.joints[:, 0].norm(dim=-1).min() > 0.05


def test_shape_scales_the_hand(model):
    pose = torch.zeros(2, 48)
    pose[:, 3:] = -model.hands_mean_for("right")  # the flat hand
    shape = torch.zeros(2, 10)
    shape[1, 0] = 2.0
    out = model("right", pose, shape)
    length = (out.joints[:, 12] - out.joints[:, 0]).norm(dim=-1)
    assert 0.18 < length[0] < 0.20
    assert length[1] / length[0] == pytest.approx(1.10, abs=0.01)


def test_bad_inputs_raise(model):
    with pytest.raises(ValueError, match="side"):
        model("up", torch.zeros(1, 48), torch.zeros(1, 10))
    with pytest.raises(ValueError, match="pose"):
        model("right", torch.zeros(1, 45), torch.zeros(1, 10))
    with pytest.raises(ValueError, match="shape"):
        model("right", torch.zeros(2, 48), torch.zeros(1, 10))


def test_default_writes_the_procedural_files_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTENTIONHAND_CACHE", str(tmp_path))
    monkeypatch.delenv("HANDS_MANO_DIR", raising=False)
    first = HandModel()
    folder = first.mano_dir
    assert folder.parent == tmp_path / "mano_procedural" and first.is_procedural
    stamp = (folder / "MANO_RIGHT.pkl").stat().st_mtime_ns
    second = HandModel()
    assert second.mano_dir == folder and (folder / "MANO_RIGHT.pkl").stat().st_mtime_ns == stamp
    assert second.fingerprint() == first.fingerprint()
    assert not list(folder.glob("*.tmp"))


def test_env_variable_names_the_mano_folder(tmp_path, monkeypatch, mano_dir):
    user = tmp_path / "user_mano"
    shutil.copytree(mano_dir, user)
    monkeypatch.setenv("HANDS_MANO_DIR", str(user))
    assert HandModel().mano_dir == user
    monkeypatch.setenv("HANDS_MANO_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="MANO_RIGHT.pkl"):
        HandModel()


# -- chumpy-free loading -----------------------------------------------------------------------------


def _official_like(mano_dir, make_ch):
    """Dicts shaped like the official files: shapedirs (and a few more) as chumpy objects, the left
    shapedirs with the official defect (x component equal to the right one's)."""
    out = {}
    for side in ("RIGHT", "LEFT"):
        data = pickle.loads((mano_dir / f"MANO_{side}.pkl").read_bytes(), encoding="latin1")
        data.pop("fingertip_verts")
        data.pop("model_source")
        out[side] = data
    out["LEFT"]["shapedirs"] = out["LEFT"]["shapedirs"] * np.array([-1.0, 1.0, 1.0])[None, :, None]  # defect
    plain = {side: {k: v for k, v in d.items()} for side, d in out.items()}
    for d in out.values():
        for key in ("shapedirs", "v_template", "J", "weights"):
            d[key] = make_ch(d[key])
    return out, plain


def _fake_chumpy(monkeypatch):
    """A stand-in ``chumpy.ch.Ch`` with chumpy's pickled state layout (array under 'x'), importable only
    while the fixture is written."""
    module = types.ModuleType("chumpy.ch")

    class Ch:
        def __init__(self, x):
            self.x = np.asarray(x, dtype=np.float64)
            self._dirty_vars = set()
            self._itr = None
            self._make_dense = False
            self._make_sparse = False
            self._depends_on_deps = {}

        def __getstate__(self):
            return dict(self.__dict__)

    Ch.__module__ = "chumpy.ch"
    Ch.__qualname__ = "Ch"
    module.Ch = Ch
    package = types.ModuleType("chumpy")
    package.ch = module
    monkeypatch.setitem(sys.modules, "chumpy", package)
    monkeypatch.setitem(sys.modules, "chumpy.ch", module)
    return Ch


def _write(folder, dicts):
    folder.mkdir()
    for side, data in dicts.items():
        (folder / f"MANO_{side}.pkl").write_bytes(pickle.dumps(data, protocol=2))


def _check_official_like(folder, plain, reference):
    for side in ("RIGHT", "LEFT"):
        loaded = load_mano_file(folder / f"MANO_{side}.pkl")
        for key in ("shapedirs", "v_template", "J", "weights"):
            assert type(loaded[key]) is np.ndarray
            np.testing.assert_array_equal(loaded[key], plain[side][key])
    model = HandModel(folder)
    assert model.left_shapedirs_fixed and not model.is_procedural
    pose, shape = _random_params(2, seed=3)
    # after the fix, the official-like files behave exactly like the procedural ones
    for side in ("right", "left"):
        torch.testing.assert_close(model(side, pose, shape).verts, reference(side, pose, shape).verts)


def test_loader_reads_chumpy_pickles_without_chumpy(tmp_path, monkeypatch, mano_dir, model):
    with monkeypatch.context() as patch:
        ch_class = _fake_chumpy(patch)
        dicts, plain = _official_like(mano_dir, ch_class)
        _write(tmp_path / "official", dicts)
    assert b"chumpy.ch" in (tmp_path / "official" / "MANO_RIGHT.pkl").read_bytes()
    _check_official_like(tmp_path / "official", plain, model)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # chumpy imports a deprecated scipy namespace
def test_loader_reads_real_chumpy_pickles(tmp_path, mano_dir, model):
    try:
        import chumpy
    except Exception as err:  # chumpy (and chumpy-fixed) may not import on this Python / numpy
        pytest.skip(f"chumpy-fixed is not importable here ({type(err).__name__}); the stand-in test covers the loader")
    dicts, plain = _official_like(mano_dir, chumpy.Ch)
    _write(tmp_path / "official", dicts)
    _check_official_like(tmp_path / "official", plain, model)


def test_dense_regressor_files_load_too(tmp_path, mano_dir, model):
    """Some cleaned copies of the official files store J_regressor as a dense array."""
    folder = tmp_path / "dense"
    folder.mkdir()
    for side in ("RIGHT", "LEFT"):
        data = pickle.loads((mano_dir / f"MANO_{side}.pkl").read_bytes(), encoding="latin1")
        data["J_regressor"] = data["J_regressor"].toarray()
        (folder / f"MANO_{side}.pkl").write_bytes(pickle.dumps(data, protocol=2))
    dense = HandModel(folder)
    torch.testing.assert_close(dense.j_regressor, model.j_regressor)


def test_not_a_mano_file_gets_a_one_line_error(tmp_path, mano_dir):
    cases = {}
    cases["garbage.pkl"] = b"this is not a pickle at all"
    cases["list.pkl"] = pickle.dumps([1, 2, 3], protocol=2)
    data = pickle.loads((mano_dir / "MANO_RIGHT.pkl").read_bytes(), encoding="latin1")
    cases["missing.pkl"] = pickle.dumps({k: v for k, v in data.items() if k not in ("f", "weights")}, protocol=2)
    cases["shape.pkl"] = pickle.dumps({**data, "posedirs": np.zeros((778, 3, 10))}, protocol=2)
    cases["evil.pkl"] = b"cos\nsystem\n(S'echo hacked'\ntR."
    expected = {
        "garbage.pkl": "cannot unpickle",
        "list.pkl": "holds a list",
        "missing.pkl": "missing keys \\['f', 'weights'\\]",
        "shape.pkl": "'posedirs' has shape \\(778, 3, 10\\), MANO needs \\(778, 3, 135\\)",
        "evil.pkl": "'os.system' is not allowed",
    }
    for name, payload in cases.items():
        path = tmp_path / name
        path.write_bytes(payload)
        with pytest.raises(ValueError, match=expected[name]) as info:
            load_mano_file(path)
        message = str(info.value)
        assert str(path) in message and "\n" not in message


def test_buffers_follow_dtype_moves(mano_dir):
    model = HandModel(mano_dir).double()
    out = model("left", torch.zeros(1, 48, dtype=torch.float64), torch.zeros(1, 10, dtype=torch.float64))
    assert out.verts.dtype == torch.float64
    buffers = dict(model.named_buffers())
    assert "faces_right" in buffers and "j_regressor_left" in buffers and "tip_verts" in buffers


def test_demo_poses_make_the_named_gestures(model):
    from hands.procedural import demo_pose

    def joints(name, side="right"):
        pose = torch.zeros(1, 48)
        pose[0, 3:] = torch.tensor(demo_pose(name, side), dtype=torch.float32)
        return model(side, pose, torch.zeros(1, 10)).joints[0]

    flat, fist, point, pinch = joints("flat"), joints("fist"), joints("point"), joints("pinch")
    reach = lambda j: (j[[8, 12, 16, 20]] - j[0]).norm(dim=-1)  # noqa: E731  wrist -> finger tips
    assert (reach(fist) < 0.75 * reach(flat)).all()  # curled fingers
    assert reach(point)[0] > 0.95 * reach(flat)[0] and (reach(point)[1:] < 0.75 * reach(flat)[1:]).all()
    assert (pinch[4] - pinch[8]).norm() < 0.02 < (flat[4] - flat[8]).norm()  # thumb meets index
    torch.testing.assert_close(joints("relaxed"), model("right", torch.zeros(1, 48), torch.zeros(1, 10)).joints[0])
    torch.testing.assert_close(joints("pinch", "left"), pinch * torch.tensor([-1.0, 1.0, 1.0]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="unknown demo pose"):
        demo_pose("wave")


def test_state_dict_carries_no_mano_data(model):
    holder = torch.nn.Module()
    holder.hands = model
    holder.head = torch.nn.Linear(2, 2)
    assert set(holder.state_dict()) == {"head.weight", "head.bias"}
    assert not list(model.parameters())  # nothing to optimise: smplx's own parameters are not created


def test_concurrent_first_use_writes_valid_files(tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from hands.mano import procedural_mano_dir

    monkeypatch.setenv("ATTENTIONHAND_CACHE", str(tmp_path))
    with ThreadPoolExecutor(max_workers=2) as pool:  # both find the folder empty and write it
        folders = list(pool.map(lambda _: procedural_mano_dir(), range(2)))
    assert len(set(folders)) == 1
    for name in ("MANO_RIGHT.pkl", "MANO_LEFT.pkl"):
        assert load_mano_file(folders[0] / name)["v_template"].shape == (778, 3)
    assert sorted(p.name for p in folders[0].iterdir()) == ["MANO_LEFT.pkl", "MANO_RIGHT.pkl"]

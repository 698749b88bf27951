"""The procedural MANO-format hand files: keys and shapes, topology, mirror, proportions, determinism."""
from __future__ import annotations

import pickle
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import scipy.sparse
import trimesh

from hands.joints import MANO_PARENTS
from hands.procedural import MODEL_SOURCE, WRIST_POSITION, main, write_procedural_mano


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    right_path, left_path = write_procedural_mano(tmp_path_factory.mktemp("mano"))
    load = lambda p: pickle.loads(p.read_bytes(), encoding="latin1")  # noqa: E731  (how smplx reads them)
    return right_path, left_path, load(right_path), load(left_path)


def test_files_have_the_official_keys_shapes_and_tree(files):
    _, _, right, left = files
    shapes = {
        "v_template": (778, 3), "f": (1538, 3), "shapedirs": (778, 3, 10), "posedirs": (778, 3, 135),
        "J_regressor": (16, 778), "J": (16, 3), "weights": (778, 16), "kintree_table": (2, 16),
        "hands_components": (45, 45), "hands_mean": (45,), "fingertip_verts": (5,),
    }
    for model in (right, left):
        for key, shape in shapes.items():
            assert model[key].shape == shape, key
        assert scipy.sparse.issparse(model["J_regressor"])
        assert model["bs_style"] == "lbs" and model["bs_type"] == "lrotmin"
        assert model["model_source"] == MODEL_SOURCE
        assert list(model["kintree_table"][0, 1:]) == list(MANO_PARENTS[1:])
        assert list(model["kintree_table"][1]) == list(range(16))
        comps = model["hands_components"]
        np.testing.assert_allclose(comps @ comps.T, np.eye(45), atol=1e-9)
        assert model["f"].min() == 0 and model["f"].max() == 777
    # J is the regressor applied to the template; the wrist joint sits where the docstring says
    np.testing.assert_allclose(right["J"], right["J_regressor"] @ right["v_template"], atol=1e-12)
    np.testing.assert_allclose(right["J"][0], WRIST_POSITION, atol=1e-9)


def test_mesh_is_a_manifold_open_only_at_a_16_edge_wrist(files):
    _, _, right, _ = files
    mesh = trimesh.Trimesh(right["v_template"], right["f"].astype(np.int64), process=False)
    edge_use = Counter(map(tuple, np.sort(mesh.edges, axis=1)))
    assert set(edge_use.values()) == {1, 2}  # no edge shared by three faces
    boundary = [e for e, n in edge_use.items() if n == 1]
    assert len(boundary) == 16
    # the 16 boundary edges form one loop, and that loop is the wrist (row 0 of the regressor)
    graph = Counter(v for e in boundary for v in e)
    assert set(graph.values()) == {2}
    loop_verts = np.array(sorted(graph))
    wrist_row = right["J_regressor"].toarray()[0]
    assert set(np.nonzero(wrist_row)[0]) == set(loop_verts)
    assert mesh.is_winding_consistent
    assert mesh.euler_number == 1  # genus 0 with one hole
    assert (mesh.area_faces > 1e-9).all()
    # capped at the wrist it is a closed surface with outward normals (positive volume)
    faces = right["f"].astype(np.int64)
    directed = {(f[i], f[(i + 1) % 3]) for f in faces for i in range(3)}
    centre = len(right["v_template"])
    cap = [(b, a, centre) for a, b in directed if (b, a) not in directed]
    capped = trimesh.Trimesh(
        np.vstack([right["v_template"], right["v_template"][loop_verts].mean(0)]), np.vstack([faces, cap]),
        process=False,
    )
    assert capped.is_watertight and capped.is_winding_consistent and capped.volume > 0
    assert 2e-4 < capped.volume < 5e-4  # m^3: a hand (to the wrist) is a few hundred millilitres


def test_left_is_the_exact_mirror_of_right(files):
    _, _, right, left = files
    np.testing.assert_array_equal(left["v_template"], right["v_template"] * [-1, 1, 1])
    np.testing.assert_array_equal(left["f"], right["f"][:, ::-1])
    np.testing.assert_array_equal(left["shapedirs"], right["shapedirs"] * np.array([-1, 1, 1])[None, :, None])
    np.testing.assert_array_equal(left["hands_mean"], right["hands_mean"] * np.tile([1, -1, -1], 15))
    np.testing.assert_array_equal(left["weights"], right["weights"])
    assert (left["J_regressor"] != right["J_regressor"]).nnz == 0


def test_proportions_of_an_adult_hand(files):
    _, _, right, _ = files
    v, j = right["v_template"], right["J"]
    thumb, index, middle, ring, pinky = right["fingertip_verts"]
    length = np.linalg.norm(v[middle] - j[0])
    assert 0.18 <= length <= 0.20
    # fingers along -x, palm facing -y, thumb on +z (the documented frame)
    assert v[middle, 0] < j[0, 0] - 0.15
    assert v[thumb, 2] > v[index, 2] > v[middle, 2] > v[ring, 2] > v[pinky, 2]
    # finger lengths from their first joint: middle > ring > index > pinky
    lengths = [np.linalg.norm(v[t] - j[k]) for t, k in ((index, 1), (middle, 4), (ring, 10), (pinky, 7))]
    assert lengths[1] > lengths[2] > lengths[0] > lengths[3]
    palm = (right["weights"][:, 13:].sum(1) < 0.1) & (np.abs(v[:, 0] - j[4, 0] - 0.02) < 0.01)  # not the thumb
    assert 0.07 < np.ptp(v[palm, 2]) < 0.10  # palm width
    assert 0.02 < np.ptp(v[palm, 1]) < 0.04  # palm thickness


def test_skinning_weights_blend_neighbouring_bones_only(files):
    _, _, right, _ = files
    w = right["weights"]
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-9)
    assert (w >= 0).all()
    parents = np.array(MANO_PARENTS)
    # every finger joint has vertices that blend its bone with the parent bone (a smooth bend)
    for joint in range(1, 16):
        both = (w[:, joint] > 0.2) & (w[:, parents[joint]] > 0.2)
        assert both.sum() >= 8, joint
    # the fingertip vertex follows the last bone of its finger only
    tips_bone = {0: 15, 1: 3, 2: 6, 3: 12, 4: 9}
    for k, tip in enumerate(right["fingertip_verts"]):
        assert w[tip, tips_bone[k]] == pytest.approx(1.0)


def test_regressor_rows_are_convex_combinations(files):
    _, _, right, _ = files
    reg = right["J_regressor"].toarray()
    assert (reg >= 0).all()
    np.testing.assert_allclose(reg.sum(1), 1.0, atol=1e-9)


def test_shape_directions_change_the_hand(files):
    _, _, right, _ = files
    sd = right["shapedirs"]
    v = right["v_template"]
    middle = right["fingertip_verts"][2]
    for k in range(10):
        assert np.abs(sd[:, :, k]).max() > 5e-4, k  # each direction moves something by more than 0.5 mm
    bigger = v + 2.0 * sd[:, :, 0]
    reg = right["J_regressor"]
    ratio = np.linalg.norm(bigger[middle] - (reg @ bigger)[0]) / np.linalg.norm(v[middle] - (reg @ v)[0])
    assert ratio == pytest.approx(1.10, abs=0.01)  # +2 sigma of size = +10 %


def test_writing_twice_gives_identical_bytes(files, tmp_path):
    right_path, left_path, _, _ = files
    right2, left2 = write_procedural_mano(tmp_path)
    assert right2.read_bytes() == right_path.read_bytes()
    assert left2.read_bytes() == left_path.read_bytes()


def test_cli_writes_both_files(tmp_path, capsys):
    main(["--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "MANO_RIGHT.pkl").is_file() and (tmp_path / "out" / "MANO_LEFT.pkl").is_file()
    assert "MANO_RIGHT.pkl" in capsys.readouterr().out


def test_importing_writes_nothing(tmp_path):
    env = {"HOME": str(tmp_path / "home"), "ATTENTIONHAND_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    code = "import hands.paths, hands.procedural, hands.mano"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=str(tmp_path.parent))
    assert not (tmp_path / "cache").exists() and not (tmp_path / "home").exists()

"""Fuzzing the readers with corrupted annotation files and images (hypothesis, 200 cases per reader).

Every outcome must be a DatasetError whose message names a path under the dataset root, or a dataset
whose samples all load (with bad records skipped and counted) and hold finite, valid labels. Never an
unrelated traceback, never NaN in a label.
"""
from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hands.datasets import DatasetError, build_dataset
from hands.datasets.fixtures import REIH_TEST_CAPTURE, write_coco_fixture, write_hic_fixture, write_ih26m_fixture, write_reih_fixture

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")  # numeric overflow is a bug too

FUZZ = settings(max_examples=200, deadline=None, derandomize=True,  # the same 200 cases on every machine
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.lists(st.integers(-3, 3), max_size=4),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
mutation = st.tuples(
    st.sampled_from(["delete", "replace", "nan", "truncate", "image"]),
    st.integers(0, 10**6),  # which file
    st.integers(0, 10**6),  # which node / cut position
    junk,
)


@pytest.fixture(scope="module")
def model():
    from hands.mano import HandModel

    return HandModel()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread avoids fighting over the cores
    yield
    torch.set_num_threads(threads)


def _nodes(tree, path=()):
    """Every (path) to a node of a JSON tree."""
    yield path
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _nodes(value, path + (key,))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            yield from _nodes(value, path + (index,))


def _mutate_json(text: str, kind: str, where: int, value) -> str:
    tree = json.loads(text)
    if kind == "truncate":
        return text[: where % max(len(text), 1)]
    nodes = [p for p in _nodes(tree) if p]
    if not nodes:
        return json.dumps(value)
    path = nodes[where % len(nodes)]
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    if kind == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = float("nan") if kind == "nan" else copy.deepcopy(value)
    return json.dumps(tree)


def _corrupt(root: Path, json_files: list[Path], image_files: list[Path], case) -> tuple[Path, bytes]:
    """Corrupt one file; returns (path, original bytes) to restore it."""
    kind, which, where, value = case
    if kind == "image":
        target = image_files[which % len(image_files)]
        data = target.read_bytes()
        target.write_bytes(data[: where % max(len(data), 1)] if where % 2 else bytes([where % 256]) * 64)
        return target, data
    target = json_files[which % len(json_files)]
    original = target.read_bytes()
    target.write_text(_mutate_json(original.decode(), kind, where, value))
    return target, original


def _check(root: Path, build) -> None:
    """Build and read everything: a clear DatasetError naming a path under root, or valid samples."""
    try:
        dataset = build()
        for index in range(len(dataset)):
            sample = dataset[index]
            sample.validate()
            assert torch.isfinite(sample.image).all() and torch.isfinite(sample.rel_root).all()
            for side in ("right", "left"):
                hand = sample.hand(side)
                for name in ("mano_pose", "mano_shape", "root_cam", "verts_cam", "joints_cam", "joints_img", "bbox"):
                    assert torch.isfinite(getattr(hand, name)).all(), f"{side}.{name} not finite"
                if bool(hand.valid):
                    x0, y0, x1, y1 = hand.bbox.tolist()
                    assert x1 > x0 and y1 > y0
        dataset.report_skips(log=lambda message: None)
    except DatasetError as error:
        assert str(root) in str(error), f"error does not name a path under the root: {error}"


def _copy(base: Path) -> tuple[Path, tempfile.TemporaryDirectory]:
    holder = tempfile.TemporaryDirectory()
    root = Path(holder.name) / "data"
    shutil.copytree(base, root)
    return root, holder


def _fuzz_once(root: Path, corrupt, build) -> None:
    """Corrupt one file of the (module-scoped) fixture, check the reader, restore the file."""
    path, original = corrupt()
    try:
        _check(root, build)
    finally:
        path.write_bytes(original)


@pytest.fixture(scope="module")
def ih26m_base(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("fuzz_ih26m")
    write_ih26m_fixture(root, model, frames=1, cameras=1, size=(24, 32), null_fit=(0, "left"))
    return root


@given(case=mutation)
@FUZZ
def test_fuzz_ih26m(ih26m_base, model, case):
    root = ih26m_base
    json_files = sorted((root / "annotations" / "test").glob("*.json"))
    images = sorted((root / "images").rglob("*.jpg"))
    _fuzz_once(root, lambda: _corrupt(root, json_files, images, case), lambda: build_dataset("ih26m", root, "test", hand_model=model))


@pytest.fixture(scope="module")
def reih_base(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("fuzz_reih")
    write_reih_fixture(root, model, captures=(REIH_TEST_CAPTURE,), frames=(0,), cameras=1, size=(24, 32), ego=True)
    return root


@given(case=mutation, ego=st.booleans())
@FUZZ
def test_fuzz_reih(reih_base, model, case, ego):
    root = reih_base
    json_files = sorted(root.rglob("*.json")) + sorted(root.rglob("frame_list.txt"))
    images = sorted(root.rglob("*.png"))
    cameras = "ego" if ego else "mugsy"
    _fuzz_once(root, lambda: _corrupt_reih(root, json_files, images, case), lambda: build_dataset("reih", root, "test", cameras=cameras, hand_model=model))


def _corrupt_reih(root, json_files, image_files, case):
    kind, which, where, value = case
    target = json_files[which % len(json_files)] if kind != "image" else None
    if target is not None and target.suffix == ".txt":  # frame_list.txt: text corruption
        original = target.read_bytes()
        text = original.decode()
        target.write_text(text[: where % max(len(text), 1)] + (str(value) if kind == "replace" else ""))
        return target, original
    return _corrupt(root, json_files, image_files, case)


@pytest.fixture(scope="module")
def hic_base(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("fuzz_hic")
    write_hic_fixture(root, model, count=2, size=(480, 640))
    return root


@given(case=mutation)
@FUZZ
def test_fuzz_hic(hic_base, model, case):
    root = hic_base
    images = sorted((root / "images").glob("*.png"))
    if case[0] == "image" and case[1] % 2:  # corrupt a mesh instead of an image
        images = sorted((root / "meshes").glob("*.ply"))
    _fuzz_once(root, lambda: _corrupt(root, [root / "HIC.json"], images, case), lambda: build_dataset("hic", root, "test", hand_model=model))


@pytest.fixture(scope="module")
def coco_base(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("fuzz_coco")
    write_coco_fixture(root, model)
    return root


@given(case=mutation)
@FUZZ
def test_fuzz_coco(coco_base, model, case):
    root = coco_base
    images = sorted((root / "images" / "train2017").glob("*.jpg"))
    json_files = [root / "annotations" / "coco_wholebody_train_v1.0.json", root / "annotations" / "MSCOCO_train_MANO_NeuralAnnot.json"]
    _fuzz_once(root, lambda: _corrupt(root, json_files, images, case), lambda: build_dataset("coco", root, "train", hand_model=model))


def test_truncated_json_names_the_file(ih26m_base, model):
    root, holder = _copy(ih26m_base)
    with holder:
        path = root / "annotations/test/InterHand2.6M_test_camera.json"
        path.write_text(path.read_text()[:20])
        with pytest.raises(DatasetError, match="InterHand2.6M_test_camera.json: not valid JSON"):
            build_dataset("ih26m", root, "test", hand_model=model)


def test_uncorrupted_fixtures_load_cleanly(ih26m_base, reih_base, hic_base, model):
    """The fuzz bases themselves read without skips (so the fuzzing starts from working data)."""
    for dataset, count in (
        (build_dataset("ih26m", ih26m_base, "test", hand_model=model), 1),
        (build_dataset("reih", reih_base, "test", hand_model=model), 1),
        (build_dataset("reih", reih_base, "test", cameras="ego", hand_model=model), 1),
        (build_dataset("hic", hic_base, "test", hand_model=model), 2),
    ):
        assert len(dataset) == count and not dataset.skipped
        for index in range(count):
            dataset[index].validate()
        assert not dataset.skipped

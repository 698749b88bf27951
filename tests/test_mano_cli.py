"""Bad MANO folders end in one line naming the file, in recon.train and recon.test; a damaged model (NaN
values) is refused before anything is rendered from it or written to the cache."""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from hands.mano import HandModel, MANOError, MANOFilesMissing
from hands.procedural import write_procedural_mano
from recon import test as recon_test
from recon import train as recon_train
from tests.recon_helpers import TINY

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def good_mano(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mano_good")
    write_procedural_mano(folder)
    return folder


def _edited(good: Path, folder: Path, side: str, edit) -> Path:
    shutil.copytree(good, folder)
    path = folder / f"MANO_{side}.pkl"
    data = pickle.loads(path.read_bytes(), encoding="latin1")
    edit(data)
    path.write_bytes(pickle.dumps(data, protocol=2))
    return folder


def _nan_template(data):
    template = np.array(data["v_template"], dtype=np.float64)
    template[10, 1] = np.nan
    data["v_template"] = template


BAD_FOLDERS = {
    # name: (make(good, folder) -> folder, the message's distinctive part)
    "missing": (lambda good, f: f, "no MANO_RIGHT.pkl in"),
    "empty": (lambda good, f: (f.mkdir(), f)[1], "no MANO_RIGHT.pkl in"),
    "a_file": (lambda good, f: (f.write_text("x"), f)[1], "a file, not a MANO folder"),
    "only_right": (lambda good, f: (shutil.copytree(good, f), (f / "MANO_LEFT.pkl").unlink(), f)[2], "no MANO_LEFT.pkl in"),
    "not_a_pickle": (lambda good, f: (shutil.copytree(good, f), (f / "MANO_RIGHT.pkl").write_bytes(b"PK\x03\x04zip"), f)[2],
                     "not a MANO model file (cannot unpickle it"),
    "other_pickle": (lambda good, f: (shutil.copytree(good, f), (f / "MANO_LEFT.pkl").write_bytes(pickle.dumps({"a": 1})), f)[2],
                     "not a MANO model file: missing keys"),
    "wrong_shape": (lambda good, f: _edited(good, f, "RIGHT", lambda d: d.update(v_template=np.zeros((700, 3)))),
                    "'v_template' has shape (700, 3), MANO needs (778, 3)"),
    "nan_template": (lambda good, f: _edited(good, f, "LEFT", _nan_template), "'v_template' holds NaN or inf values"),
    "bad_faces": (lambda good, f: _edited(good, f, "RIGHT", lambda d: d.update(f=np.full((1538, 3), 900))),
                  "'f' holds values outside the 778 vertex indices"),
}


@pytest.mark.parametrize("name", sorted(BAD_FOLDERS))
def test_a_bad_mano_folder_is_one_line_in_train_and_test(name, good_mano, tmp_path, capsys, monkeypatch):
    make, message = BAD_FOLDERS[name]
    folder = make(good_mano, tmp_path / "mano")
    cache = tmp_path / "cache"
    monkeypatch.setenv("ATTENTIONHAND_CACHE", str(cache))  # the embedded synthlab would be written here
    with pytest.raises(MANOError, match=None) as info:
        HandModel(folder)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, MANOFilesMissing) == (name in ("missing", "empty", "a_file", "only_right"))
    out = tmp_path / "run"
    assert recon_train.main(["--mano-dir", str(folder), "--out", str(out), "--max-steps", "1", *TINY]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("recon.train: error: ") and message in error and "\n" not in error, error
    assert not out.exists() and not (cache / "synthlab").exists()  # nothing written, nothing rendered
    # recon.test with a (fake) checkpoint path never gets that far: the MANO folder is refused first
    ckpt = _tiny_checkpoint(tmp_path)
    assert recon_test.main(["--ckpt", str(ckpt), "--mano-dir", str(folder), "--out", str(tmp_path / "m.json")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("recon.test: error: ") and message in error and "\n" not in error, error


def _tiny_checkpoint(tmp_path: Path) -> Path:
    """A real checkpoint of an InterWild-free regressor that builds a HandModel from mano_dir (baseline)."""
    from recon import checkpoint as ckpt
    from recon.config import load_config, to_dict
    from recon.registry import build_regressor, load_builtin_regressors

    load_builtin_regressors()
    kwargs = dict(backbone="resnet18", backbone_kwargs={"channels": [8, 16, 32, 64], "stem_width": 8}, hidden_dim=32)
    model = build_regressor("baseline", **kwargs)
    progress = {"step": 1, "epoch": 0, "step_in_epoch": 1, "sampler_seed": 0, "world_size": 1}
    cfg = to_dict(load_config(overrides=TINY))
    return ckpt.save_checkpoint(tmp_path / "ckpt", model=model, arch="baseline", model_kwargs=kwargs, config=cfg,
                                optimizer=None, progress=progress)

"""docs/new-regressor.md, executed: its plugin module, written into a temporary folder, trains through
recon.train --plugin and evaluates through recon.test --plugin; without the plugin the test is refused."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from recon import test as recon_test
from recon import train as recon_train
from tests.recon_helpers import write_tiny_synthlab

DOC = Path(__file__).resolve().parents[1] / "docs" / "new-regressor.md"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _plugin_source() -> str:
    text = DOC.read_text()
    section = text[text.index("## A complete plugin") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_documented_plugin_trains_and_tests(tmp_path, capsys):
    plugin = tmp_path / "my_regressor.py"
    plugin.write_text(_plugin_source())
    root = write_tiny_synthlab(tmp_path / "synthlab")
    out = tmp_path / "tiny"
    argv = [
        "--plugin", str(plugin), "--arch", "tiny_cnn", "--out", str(out),
        "--data-root", str(root), "--datasets", "synthlab", "--test-datasets", "synthlab:test-wild",
        "--batch-size", "4", "--max-steps", "3", "model.width=8", "data.image_size=[64,64]", "train.image_every=0",
    ]
    assert recon_train.main(argv) == 0
    sidecar = json.loads(next((out / "checkpoints").glob("*.json")).read_text())
    assert sidecar["arch"] == "tiny_cnn" and sidecar["model_kwargs"] == {"width": 8, "mano_dir": None, "weight_rel_root": 10.0}
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["skips", "synthlab-test-wild", "weights"] and metrics["synthlab-test-wild"]["count_MPVPE"] > 0

    # the documented unknown-key message
    assert recon_train.main([*argv, "model.depth=3"]) == 2
    assert (
        "config: unknown key 'model.depth' for regressor 'tiny_cnn'; it takes: width, mano_dir, weight_rel_root"
        in capsys.readouterr().err
    )

    result = tmp_path / "test.json"
    assert recon_test.main(["--plugin", str(plugin), "--ckpt", str(out), "--out", str(result)]) == 0
    again = json.loads(result.read_text())
    assert again["synthlab-test-wild"]["MPVPE"] == pytest.approx(metrics["synthlab-test-wild"]["MPVPE"], rel=1e-5)

    # a checkpoint of a regressor nobody registered (the plugin not passed) is refused in one line
    sidecar_path = next((out / "checkpoints").glob("*.json"))
    meta = json.loads(sidecar_path.read_text())
    meta["arch"] = "_never_registered"
    sidecar_path.write_text(json.dumps(meta))
    capsys.readouterr()  # drop the evaluation's progress bars above
    assert recon_test.main(["--ckpt", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert "regressor '_never_registered' is not registered" in error and "--plugin" in error and "\n" not in error

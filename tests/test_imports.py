"""Importing any module of the project has no side effects: no files written, no environment edits, no
network connections."""
import json
import subprocess
import sys
from pathlib import Path

CODE = r"""
import importlib, json, os, pkgutil, socket, sys

def refuse(*args, **kwargs):
    raise RuntimeError(f"network connection at import: {args!r}")

socket.socket.connect = refuse
socket.create_connection = refuse
# third-party libraries first: their own import-time settings (diffusers and timm set TORCHINDUCTOR_CACHE_DIR
# through torch's inductor) are theirs, not ours
import torch, diffusers, transformers, timm, kornia, smplx  # noqa: E401,F401
before = dict(os.environ)
names = []
for package in ("hands", "eval", "generator", "mixing", "recon", "benchmarks"):
    module = importlib.import_module(package)
    names.append(package)
    for info in pkgutil.walk_packages(module.__path__, prefix=package + "."):
        importlib.import_module(info.name)
        names.append(info.name)
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
print(json.dumps({"modules": names, "env_changed": changed}))
"""


def test_importing_every_module_writes_nothing_and_leaves_the_environment_alone(tmp_path):
    home, cache = tmp_path / "home", tmp_path / "cache"
    repo = Path(__file__).resolve().parents[1]
    env = {"HOME": str(home), "ATTENTIONHAND_CACHE": str(cache), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(repo)}
    result = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"recon.train", "mixing.pool", "generator.pipeline", "hands.render", "eval.metrics"} <= set(report["modules"])
    assert report["env_changed"] == []
    assert not cache.exists() and not home.exists()
    assert not any(tmp_path.iterdir())  # nothing written in the working folder either


# ARCHITECTURE.md's one direction: hands <- eval, hands <- generator <- mixing <- recon, recon -> eval
DOWNSTREAM = {"hands": {"eval", "generator", "mixing", "recon"}, "eval": {"generator", "mixing", "recon"},
              "generator": {"mixing", "recon"}, "mixing": {"recon"}}

DIRECTION = r"""
import importlib, json, pkgutil, sys
package = sys.argv[1]
module = importlib.import_module(package)
for info in pkgutil.walk_packages(module.__path__, prefix=package + "."):
    importlib.import_module(info.name)
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def test_importing_a_package_loads_none_of_the_packages_downstream_of_it(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    env = {"HOME": str(tmp_path), "ATTENTIONHAND_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(repo)}
    for package, downstream in DOWNSTREAM.items():
        result = subprocess.run([sys.executable, "-c", DIRECTION, package], env=env, capture_output=True, text=True,
                                cwd=str(tmp_path), timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        loaded = set(json.loads(result.stdout.strip().splitlines()[-1]))
        assert not loaded & downstream, f"importing {package} loads {sorted(loaded & downstream)}"

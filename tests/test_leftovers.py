"""Partial files of killed writers are cleaned by the next writer, never a live writer's."""
from __future__ import annotations

import os
import subprocess
import sys

from hands.datasets import synthlab


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_synthlab_writers_temporary_folder_is_removed_by_the_next_first_use(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTENTIONHAND_CACHE", str(tmp_path / "cache"))
    parent = tmp_path / "cache" / "synthlab"
    host = synthlab._HOST
    dead = parent / f".synthlab-{host}-{_dead_pid()}-abc123"
    live = parent / f".synthlab-{host}-{os.getppid()}-def456"  # a writer still running
    other_host = parent / f".synthlab-elsewhere-{_dead_pid()}-ghi789"  # a shared cache: not ours to judge
    for folder in (dead, live, other_host):
        (folder / "images").mkdir(parents=True)
    sizes = {"train-lab": 1, "test-lab": 0, "train-wild": 0, "test-wild": 0}
    root = synthlab.ensure_synthlab(sizes=sizes, resolution=48, show_progress=False)
    assert (root / "synthlab.json").is_file()
    assert not dead.exists() and live.exists() and other_host.exists()

"""Which code produced a result: the package version and the git commit of this checkout, for result files.

:func:`code_version` runs ``git`` once per process (cached), only when called; outside a checkout its git
fields are None."""
from __future__ import annotations

import functools
import subprocess
from pathlib import Path

__all__ = ["code_version"]


@functools.lru_cache(maxsize=1)
def code_version() -> dict:
    """{"package", "version", "git_commit", "git_dirty"} of this code (git fields None outside a checkout)."""
    from importlib import metadata

    try:
        version = metadata.version("attentionhand-aug")
    except metadata.PackageNotFoundError:
        version = None
    where = Path(__file__).resolve().parent.parent
    commit, dirty = None, None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip() or None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=where, capture_output=True, text=True,
            timeout=10, check=True,
        ).stdout
        dirty = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return {"package": "attentionhand-aug", "version": version, "git_commit": commit, "git_dirty": dirty}

"""Where the project keeps files it writes for itself (the procedural MANO files, synthlab, caches).

The cache folder is ``$ATTENTIONHAND_CACHE`` when set, else ``~/.cache/attentionhand-aug``. Nothing is created
at import: :func:`cache_dir` creates the folder when it is first asked for.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir", "CACHE_ENV"]

CACHE_ENV = "ATTENTIONHAND_CACHE"


def cache_dir() -> Path:
    """The project's cache folder, created on demand: ``$ATTENTIONHAND_CACHE`` or ``~/.cache/attentionhand-aug``."""
    env = os.environ.get(CACHE_ENV)
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "attentionhand-aug"
    path.mkdir(parents=True, exist_ok=True)
    return path

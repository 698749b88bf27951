"""Where the project keeps files it writes for itself (the procedural MANO files, synthlab, caches).

The cache folder is ``$ATTENTIONHAND_CACHE`` when set, else ``~/.cache/attentionhand-aug``. Nothing is created
at import: :func:`cache_dir` creates the folder when it is first asked for.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["cache_dir", "write_atomic", "output_folder", "output_file", "CACHE_ENV"]

CACHE_ENV = "ATTENTIONHAND_CACHE"


def cache_dir() -> Path:
    """The project's cache folder, created on demand: ``$ATTENTIONHAND_CACHE`` or ``~/.cache/attentionhand-aug``."""
    env = os.environ.get(CACHE_ENV)
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "attentionhand-aug"
    path.mkdir(parents=True, exist_ok=True)
    return path


def output_folder(path: str | Path, what: str) -> Path:
    """Create the output folder ``path`` (with its parents) and return it; ValueError in one line naming
    ``what`` (e.g. ``"--out"``) when it is a file, lies under a file or cannot be created."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path}: is a file; expected a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{what} {path}: cannot create the folder ({error.strerror or type(error).__name__})") from None
    return path


def output_file(path: str | Path, what: str) -> Path:
    """Check that the output file ``path`` can be written (creating its folder); ValueError in one line
    naming ``what`` when it is a folder or its folder cannot be created."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{what} {path}: is a folder; expected a file name")
    output_folder(path.parent, what)
    return path


def write_atomic(path: str | Path, write: Callable[[str], None]) -> Path:
    """Write a file through ``write(tmp_path)`` into a temporary file beside ``path``, then rename it into place
    (``os.replace``: atomic on one file system), so a reader never sees half of it; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp made it 0600; give it the permissions of a plain open()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path

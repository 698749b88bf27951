"""Run folders: one run per ``--out``, owned by one process at a time, its checkpoints tied to its run id.

What ``recon.train`` does with its ``--out`` folder, before it writes anything there:

1. The lock. ``<out>/run.lock`` is created exclusively (written whole under a temporary name, then hard-linked
   into place, so it is never seen half-written) and names the owning process, host, run id and start time.
   A second run with the same ``--out`` is refused in one line naming that process. A lock left by a process
   that died (same host, no such pid) is taken over with a note; the lock is removed when the run ends.
2. The folder's run. A *new* run refuses a folder that already holds a run's files (``config.yaml``,
   ``metrics.json``, ``run.json``, ``checkpoints/``, ``tb/``, ...) unless ``--overwrite`` is given, which deletes
   those files first; other files (``train.log`` of ``recon.table2``, a user's notes) are left alone. A
   *resumed* run must continue the run the folder holds (the same run id) and from its newest checkpoint;
   ``--overwrite`` with ``--resume`` drops that run's later checkpoints instead.
3. ``<out>/run.json`` records the run id (a new one per new run, the checkpoint's when resuming), written
   when the run writes its first file (:meth:`RunFolder.record`, with ``config.yaml``): a run refused or
   failing before that leaves the folder as it found it (a folder it created is removed). Every
   checkpoint's sidecar carries the run id, pruning removes only this run's older checkpoints, and
   :func:`recon.checkpoint.find_checkpoint` on the folder picks the newest checkpoint *of this run*.
4. Leftovers: holding the lock, any ``*.tmp-<pid>`` file of an interrupted checkpoint write and any
   ``.metrics.json.tmp`` is stale (its writer is gone); they are deleted and counted.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

__all__ = ["RunFolderError", "RunFolder", "claim_run_folder", "new_run_id", "RUN_FILES", "LOCK_NAME", "RUN_JSON"]

LOCK_NAME = "run.lock"
RUN_JSON = "run.json"
# What a run writes into its folder; a new run refuses a folder holding any of them (unless --overwrite).
RUN_FILES = ("run.json", "config.yaml", "metrics.json", "metrics.previous.json", "test_metrics.json", "checkpoints",
             "averaged", "tb")


class RunFolderError(ValueError):
    """A ``--out`` folder that cannot be used for this run, in one line naming it and what to do."""


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except (OverflowError, ValueError, OSError):
        return False
    return True


def _read_lock(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_lock(path: Path, content: dict) -> bool:
    """Create ``path`` with ``content`` unless it exists; True when this call created it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(content, indent=2, sort_keys=True))
    try:
        os.link(tmp, path)  # atomic and exclusive: fails when the lock exists, never leaves half a lock
        return True
    except FileExistsError:
        return False
    except OSError as error:  # a file system without hard links: exclusive create instead
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(content, indent=2, sort_keys=True))
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _occupied(out: Path) -> list[str]:
    """The run files present in ``out`` (empty folders do not count)."""
    found = []
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            if any(path.iterdir()):
                found.append(name + "/")
        elif path.exists():
            found.append(name)
    return found


def _sidecar_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _remove_checkpoint(sidecar: Path) -> None:
    for path in (sidecar, sidecar.with_suffix(".safetensors"), sidecar.with_name(sidecar.stem + ".state.pt")):
        path.unlink(missing_ok=True)  # the JSON first: a half-deleted checkpoint is never "complete"


@dataclass
class RunFolder:
    """A claimed ``--out`` folder; :meth:`record` writes ``run.json``, :meth:`release` (or the context
    manager) removes the lock, and the folder too when this claim created it and nothing was written."""

    path: Path
    run_id: str
    notes: list[str] = field(default_factory=list)
    _lock: Optional[Path] = None
    _created: bool = False

    def record(self) -> None:
        """Write ``run.json`` (the run id): from now on the folder holds this run."""
        content = {"run_id": self.run_id, "host": socket.gethostname(), "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        tmp = self.path / f".{RUN_JSON}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(content, indent=2, sort_keys=True))
        os.replace(tmp, self.path / RUN_JSON)

    def release(self) -> None:
        if self._lock is None:
            return
        owner = _read_lock(self._lock) or {}
        if owner.get("pid") == os.getpid() and owner.get("run_id") == self.run_id:
            self._lock.unlink(missing_ok=True)
        self._lock = None
        if self._created:
            try:
                self.path.rmdir()  # only when empty: a run that wrote nothing leaves no folder behind
            except OSError:
                pass

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _take_lock(out: Path, run_id: str, notes: list[str]) -> Path:
    lock = out / LOCK_NAME
    content = {"pid": os.getpid(), "host": socket.gethostname(), "run_id": run_id,
               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for _ in range(3):
        if _write_lock(lock, content):
            return lock
        owner = _read_lock(lock)
        if owner is None:  # released meanwhile
            continue
        pid, host = owner.get("pid"), owner.get("host")
        if isinstance(pid, int) and host == socket.gethostname() and not _pid_alive(pid):
            lock.unlink(missing_ok=True)
            notes.append(f"took over the lock of process {pid}, which is gone ({lock})")
            continue
        if not owner:
            raise RunFolderError(
                f"--out {out}: {lock} exists but is unreadable; another run may own this folder "
                "(delete the lock if none does)"
            )
        raise RunFolderError(
            f"--out {out}: in use by process {pid} on {host} since {owner.get('started')} (run {owner.get('run_id')}, "
            f"{lock}); wait for it to end or give another --out (delete the lock only if that process is gone)"
        )
    raise RunFolderError(f"--out {out}: could not take {lock}; another run keeps claiming this folder")


def _clean_leftovers(out: Path, notes: list[str]) -> None:
    stale = [p for sub in ("checkpoints", "averaged") if (out / sub).is_dir() for p in (out / sub).glob("*.tmp-*") if p.is_file()]
    stale += [p for p in out.glob(".metrics.json.tmp*") if p.is_file()]
    stale += [p for p in out.glob(f".{LOCK_NAME}.tmp-*") if p.is_file() and not p.name.endswith(f"-{os.getpid()}")]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        notes.append(f"removed {len(stale)} partial file(s) left by an interrupted write in {out}")


def claim_run_folder(
    out: str | Path,
    *,
    resume_meta: Optional[dict] = None,
    overwrite: bool = False,
    say: Callable[[str], None] = print,
) -> RunFolder:
    """Lock ``out`` for this run and make it hold this run only; returns the claimed folder.

    resume_meta: the sidecar of the checkpoint a resumed run continues (None for a new run).
    overwrite: a new run deletes the run files of a folder that holds another run; a resumed run deletes
        its run's checkpoints later than the one it resumes.
    Raises RunFolderError (one line) when ``out`` is a file, is locked by a live process, or holds a run
    this one may not touch.
    """
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out}: is a file; expected a run folder (a new or empty one, or this run's)")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunFolderError(f"--out {out}: cannot create the folder ({error.strerror or error})") from None
    if not os.access(out, os.W_OK):
        raise RunFolderError(f"--out {out}: not writable")
    resuming = resume_meta is not None
    run_id = str(resume_meta.get("run_id") or new_run_id()) if resuming else new_run_id()
    notes: list[str] = []
    lock = _take_lock(out, run_id, notes)
    folder = RunFolder(path=out, run_id=run_id, notes=notes, _lock=lock, _created=created)
    try:
        _clean_leftovers(out, notes)
        if resuming:
            _check_resume(out, run_id, resume_meta, overwrite, notes)
        else:
            occupied = _occupied(out)
            if occupied and not overwrite:
                raise RunFolderError(
                    f"--out {out}: holds a run already ({', '.join(occupied)}); continue it with --resume, "
                    "replace it with --overwrite, or give another --out"
                )
            for name in occupied:
                target = out / name.rstrip("/")
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            if occupied:
                notes.append(f"--overwrite: deleted the previous run's {', '.join(occupied)} in {out}")
    except BaseException:
        folder.release()
        raise
    for note in notes:
        say(f"run folder: {note}")
    return folder


def _check_resume(out: Path, run_id: str, resume_meta: dict, overwrite: bool, notes: list[str]) -> None:
    """A resumed run continues the run in ``out`` (or an empty folder) from that run's newest checkpoint."""
    recorded = _sidecar_meta(out / RUN_JSON).get("run_id")
    if recorded is not None and recorded != run_id:
        raise RunFolderError(
            f"--out {out}: holds run {recorded}, but the checkpoint to resume belongs to run "
            f"{resume_meta.get('run_id') or '(none recorded)'}; resume into that run's folder or an empty --out"
        )
    if recorded is None and _occupied(out) and not (out / "checkpoints").is_dir():
        raise RunFolderError(
            f"--out {out}: holds files of another run ({', '.join(_occupied(out))}) but no checkpoints; "
            "resume into an empty --out"
        )
    step = int(resume_meta.get("step", 0))

    def later_in(folder: Path) -> list[Path]:  # this run's checkpoints after the resumed step
        return [
            sidecar for sidecar in (sorted(folder.glob("step_*.json")) if folder.is_dir() else [])
            if (meta := _sidecar_meta(sidecar)).get("run_id", run_id if recorded is None else None) == run_id
            and int(meta.get("step", -1)) > step
        ]

    folder = out / "checkpoints"
    later = later_in(folder)
    if later and not overwrite:
        raise RunFolderError(
            f"--resume: {out} holds later checkpoints of this run ({later[-1].name}); resume from the newest "
            "(--resume with no value) or add --overwrite to delete the later ones"
        )
    if later:  # the averages of the discarded steps (train.average_last) go with them
        for sidecar in later + later_in(out / "averaged"):
            _remove_checkpoint(sidecar)
        notes.append(f"--overwrite: deleted {len(later)} checkpoint(s) after step {step} in {folder}")

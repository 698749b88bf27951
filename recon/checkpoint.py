"""Checkpoints: weights, training state and a JSON sidecar that describes them.

A checkpoint named ``step_000200`` in a folder is three files, written in this order, each to a temporary
name first and then moved into place with ``os.replace`` (atomic on one file system):

- ``step_000200.safetensors``: the model's weights (``safetensors.torch.save_model``).
- ``step_000200.state.pt``: what resuming needs besides the weights: the optimizer's ``state_dict`` and the
  random-number states (torch CPU and CUDA, NumPy, Python), saved with ``torch.save`` and read back with
  ``weights_only=True``. A separate file keeps the weights file loadable by any safetensors reader.
- ``step_000200.json``: the sidecar, written last, so its presence marks a complete checkpoint: format
  version, the regressor's registry name and constructor arguments, the full run config, the data-order
  state (epoch, step, step within the epoch, sampler seed, world size) and the SHA-256 of the two other
  files, which turns a truncated or swapped file into a clear error rather than silent garbage; and the
  ``run_id`` of the run that wrote it (:mod:`recon.runs`).

``recon.test`` needs the ``.safetensors`` and ``.json`` files only.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_model
from torch import nn

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "save_checkpoint",
    "read_checkpoint_info",
    "find_checkpoint",
    "load_weights",
    "load_training_state",
    "capture_rng_state",
    "restore_rng_state",
]

FORMAT = "attentionhand-aug/recon-checkpoint"
VERSION = 1
_NAME = re.compile(r"^step_(\d+)\.json$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, in one line naming the file and what is wrong."""


@dataclass
class CheckpointInfo:
    """The parsed sidecar of one checkpoint.

    json_path: the sidecar; weights_path / state_path: the other two files.
    meta: the sidecar's content (arch, model_kwargs, config, step, epoch, step_in_epoch, ...).
    """

    json_path: Path
    weights_path: Path
    state_path: Path
    meta: dict

    @property
    def arch(self) -> str:
        return self.meta["arch"]

    @property
    def model_kwargs(self) -> dict:
        return dict(self.meta["model_kwargs"])

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _replace_atomically(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, final)


def capture_rng_state() -> dict:
    """The random states of torch (CPU and every CUDA device), NumPy and Python, as torch-loadable values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(
    folder: str | Path,
    *,
    model: nn.Module,
    arch: str,
    model_kwargs: dict,
    config: dict,
    optimizer: Optional[torch.optim.Optimizer],
    progress: dict,
    keep_last: int = 0,
    extra: Optional[dict] = None,
    run_id: Optional[str] = None,
    scaler: Optional[torch.amp.GradScaler] = None,
    resumable: bool = True,
) -> Path:
    """Write ``folder/step_<progress['step']>.{safetensors,state.pt,json}`` atomically; returns the JSON path.

    progress: data-order state, at least ``step`` (optimizer steps done), ``epoch``, ``step_in_epoch``
        (batches of ``epoch`` already consumed), ``sampler_seed`` and ``world_size``.
    keep_last: when > 0, delete this run's older complete checkpoints in ``folder`` beyond the newest
        ``keep_last`` (checkpoints of other runs are never touched).
    run_id: the run the checkpoint belongs to (:mod:`recon.runs`), recorded in the sidecar; pruning and
        :func:`find_checkpoint` on a run folder go by it.
    scaler: fp16 training's GradScaler; its state goes into the training state (``"scaler"``).
    resumable: False writes the weights and the sidecar only (``"resumable": false``, no state file), e.g. averaged
        weights: ``read_checkpoint_info(..., need_state=True)`` refuses them in one line.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"step_{int(progress['step']):06d}"
    weights_path, state_path, json_path = (folder / f"{stem}{suffix}" for suffix in (".safetensors", ".state.pt", ".json"))
    tmp = f".tmp-{os.getpid()}"

    weights_tmp = weights_path.with_name(weights_path.name + tmp)
    save_model(model, str(weights_tmp), metadata={"format": FORMAT, "arch": arch})
    _replace_atomically(weights_tmp, weights_path)

    if resumable:
        state = {"optimizer": optimizer.state_dict() if optimizer is not None else None, "rng": capture_rng_state()}
        if scaler is not None and scaler.is_enabled():  # fp16 training: the loss scale resumes where it was
            state["scaler"] = scaler.state_dict()
        state_tmp = state_path.with_name(state_path.name + tmp)
        torch.save(state, state_tmp)
        _replace_atomically(state_tmp, state_path)

    meta = {
        "format": FORMAT,
        "version": VERSION,
        "arch": arch,
        "model_kwargs": model_kwargs,
        "config": config,
        "run_id": run_id,
        **{key: value for key, value in progress.items()},
        "weights": weights_path.name,
        "weights_sha256": _sha256(weights_path),
        **({"state": state_path.name, "state_sha256": _sha256(state_path)} if resumable else {"resumable": False}),
        **(extra or {}),
    }
    json_tmp = json_path.with_name(json_path.name + tmp)
    json_tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    _replace_atomically(json_tmp, json_path)

    if keep_last > 0:
        for old in _complete_checkpoints(folder, run_id=run_id, by_run=True)[:-keep_last]:
            for path in (old, old.with_suffix(".safetensors"), old.with_name(old.stem + ".state.pt")):
                path.unlink(missing_ok=True)  # the JSON first: a half-deleted checkpoint is never "complete"
    return json_path


def _sidecar_meta(sidecar: Path) -> dict:
    """A sidecar's JSON object, {} when it cannot be read (a listing skips such files; reading one for use goes
    through :func:`read_checkpoint_info`, which says why)."""
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _run_id_of(sidecar: Path) -> Optional[str]:
    return _sidecar_meta(sidecar).get("run_id")


def _complete_checkpoints(folder: Path, run_id: Optional[str] = None, by_run: bool = False) -> list[Path]:
    """Sidecars in ``folder`` ordered by step (oldest first); with ``by_run``, only those of ``run_id`` (None:
    the checkpoints that record no run)."""
    found = [(int(m.group(1)), p) for p in folder.glob("step_*.json") if (m := _NAME.match(p.name))]
    if by_run:
        found = [(step, p) for step, p in found if _run_id_of(p) == run_id]
    return [path for _, path in sorted(found)]


def folder_run_id(run_folder: Path) -> Optional[str]:
    """The run id recorded in ``run_folder/run.json`` (:mod:`recon.runs`), None without one."""
    try:
        data = json.loads((run_folder / "run.json").read_text())
    except (OSError, ValueError):
        return None
    return data.get("run_id") if isinstance(data, dict) and isinstance(data.get("run_id"), str) else None


def _newest_in(folder: Path, run_folder: Path) -> Optional[Path]:
    """The newest checkpoint in ``folder`` of the run ``run_folder`` records; without a record, the newest
    when every checkpoint there belongs to one run (CheckpointError when they belong to several)."""
    found = _complete_checkpoints(folder)
    if not found:
        return None
    run_id = folder_run_id(run_folder)
    if run_id is not None:  # a checkpoint without a run id predates run ids: it counts as the folder's run's
        own = [path for path in found if _run_id_of(path) in (run_id, None)]
        if not own:
            raise CheckpointError(
                f"{folder}: no checkpoint of run {run_id} (recorded in {run_folder / 'run.json'}); "
                "name a checkpoint file instead of the folder"
            )
        return own[-1]
    runs = {_run_id_of(path) for path in found} - {None}
    if len(runs) > 1:
        raise CheckpointError(
            f"{folder}: checkpoints of {len(runs)} different runs and no run.json naming one; name a checkpoint file"
        )
    return found[-1]


def find_checkpoint(path: str | Path) -> Path:
    """Resolve a user's checkpoint path to a sidecar: a ``.json`` sidecar, a ``.safetensors`` file (its
    sidecar beside it), or a folder (its newest checkpoint, also looking into ``checkpoints/``; in a run folder, the newest
    of the run its ``run.json`` names)."""
    path = Path(path)
    if path.is_dir():
        for folder, run_folder in ((path, path.parent if path.name in ("checkpoints", "averaged") else path),
                                   (path / "checkpoints", path)):
            found = _newest_in(folder, run_folder) if folder.is_dir() else None
            if found is not None:
                return found
        raise CheckpointError(f"{path}: no checkpoint (step_*.json) in this folder or its checkpoints/")
    if path.suffix == ".safetensors":
        sidecar = path.with_suffix(".json")
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file")
        if not sidecar.is_file():
            raise CheckpointError(f"{path}: its sidecar {sidecar.name} is missing (the checkpoint is incomplete)")
        return sidecar
    if path.suffix == ".json":
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file")
        return path
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    raise CheckpointError(f"{path}: expected a .safetensors or .json checkpoint file or a run folder")


def read_checkpoint_info(path: str | Path, *, need_state: bool = False) -> CheckpointInfo:
    """Parse and check a checkpoint's sidecar and the presence and checksums of its files."""
    json_path = find_checkpoint(path)
    try:
        meta = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{json_path}: not a valid JSON sidecar ({error.__class__.__name__}: {error})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{json_path}: not a recon checkpoint sidecar (no format {FORMAT!r})")
    if int(meta.get("version", -1)) > VERSION:
        raise CheckpointError(f"{json_path}: checkpoint format version {meta.get('version')} is newer than {VERSION}")
    for key in ("arch", "model_kwargs", "config", "step", "weights", "weights_sha256"):
        if key not in meta:
            raise CheckpointError(f"{json_path}: sidecar lacks the key {key!r}")
    if need_state and (meta.get("resumable") is False or "averaged_steps" in meta):
        raise CheckpointError(
            f"{json_path}: not resumable (weights only{', the mean of steps ' + str(meta['averaged_steps']) if 'averaged_steps' in meta else ''}); "
            "resume from a checkpoint in the run's checkpoints/ folder"
        )
    if need_state:  # what resuming reads besides the weights: the data order and the state file
        for key in ("epoch", "step_in_epoch", "state", "state_sha256"):
            if key not in meta:
                raise CheckpointError(f"{json_path}: sidecar lacks the key {key!r} (needed to resume)")
    kinds = {"arch": str, "model_kwargs": dict, "config": dict, "weights": str, "weights_sha256": str}
    for key, kind in kinds.items():
        if not isinstance(meta[key], kind):
            raise CheckpointError(f"{json_path}: sidecar key {key!r} is not a {'JSON object' if kind is dict else 'string'}")
    for key in ("step", "epoch", "step_in_epoch", "world_size"):
        value = meta.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(f"{json_path}: sidecar key {key!r} is {value!r}; expected a non-negative integer")
    for key in ("weights", "state") if meta.get("resumable") is not False else ("weights",):
        name = meta.get(key, "x")
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            raise CheckpointError(f"{json_path}: sidecar key {key!r} is {name!r}; expected a file name beside the sidecar")
    weights_path = json_path.with_name(meta["weights"])
    state_path = json_path.with_name(meta.get("state", json_path.stem + ".state.pt"))
    if not weights_path.is_file():
        raise CheckpointError(f"{json_path}: its weights file {weights_path.name} is missing")
    if _sha256(weights_path) != meta["weights_sha256"]:
        raise CheckpointError(
            f"{weights_path}: checksum differs from the sidecar's (truncated, corrupt or replaced weights)"
        )
    if need_state:
        if not state_path.is_file():
            raise CheckpointError(f"{json_path}: its training-state file {state_path.name} is missing")
        if _sha256(state_path) != meta.get("state_sha256"):
            raise CheckpointError(f"{state_path}: checksum differs from the sidecar's (truncated or corrupt)")
    return CheckpointInfo(json_path=json_path, weights_path=weights_path, state_path=state_path, meta=meta)


def load_weights(model: nn.Module, info: CheckpointInfo, device: str | torch.device = "cpu") -> None:
    """Load the checkpoint's weights into ``model`` (strict); mismatches raise CheckpointError in one line."""
    try:
        missing, unexpected = load_model(model, str(info.weights_path), strict=False, device=str(device))
        missing, unexpected = sorted(missing), sorted(unexpected)
    except SafetensorError as error:
        raise CheckpointError(f"{info.weights_path}: unreadable safetensors file ({error})") from None
    except RuntimeError as error:  # size mismatches from load_state_dict
        first = " ".join(str(error).split())[:300]
        raise CheckpointError(f"{info.weights_path}: weights do not fit regressor {info.arch!r}: {first}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{info.weights_path}: weights do not fit regressor {info.arch!r}: "
            f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}"
        )


def run_checkpoints(folder: str | Path, run_id: Optional[str], *, scheduled_only: bool = False) -> list[Path]:
    """The complete checkpoints (sidecars) of run ``run_id`` in ``folder``, oldest first; with ``scheduled_only``,
    without those written when a run was interrupted (``"interrupted": true``: an average over them would depend
    on where a run was stopped)."""
    folder = Path(folder)
    found = _complete_checkpoints(folder, run_id=run_id, by_run=True) if folder.is_dir() else []
    if scheduled_only:
        found = [path for path in found if _sidecar_meta(path).get("interrupted") is not True]
    return found


def average_checkpoints(model: nn.Module, sidecars: Sequence[str | Path]) -> list[int]:
    """Load into ``model`` the uniform mean of the checkpoints' weights (stochastic weight averaging over saved
    checkpoints, Izmailov et al. 2018, without its BatchNorm update): every floating-point parameter and buffer
    (BatchNorm's running statistics included) is averaged in float64; integer buffers (``num_batches_tracked``)
    are the last given checkpoint's. Each file is checked (checksum, and strictly against the model's keys and shapes:
    CheckpointError in one line), read into host memory and loaded into the model wherever it lives
    (``load_state_dict``, so the model's load hooks run); the sum is kept on the model's device. Returns the
    checkpoints' steps, in the order given.

    Not ``torch.optim.swa_utils.AveragedModel``: it keeps a second copy of the model on the device and its running
    mean would average the integer buffers too; here the files are the models and the mean is exact."""
    if not sidecars:
        raise CheckpointError("average_checkpoints: no checkpoints to average")
    current = model.state_dict()
    total: dict = {}
    steps = []
    for sidecar in sidecars:
        info = read_checkpoint_info(sidecar)
        try:  # read on the host, then each tensor moved to its model tensor's device and copied in
            saved = load_file(str(info.weights_path), device="cpu")
        except SafetensorError as error:
            raise CheckpointError(f"{info.weights_path}: unreadable safetensors file ({error})") from None
        loaded = {current[key].data_ptr() for key in saved if key in current}  # safetensors stores a shared tensor once
        unexpected = sorted(key for key in saved if key not in current or saved[key].shape != current[key].shape)
        missing = sorted(key for key in current if key not in saved and current[key].data_ptr() not in loaded)
        if not unexpected:
            # Through load_state_dict, so that a regressor's load hooks see every file and their one-line refusal
            # (e.g. IntagHand's checkpoint without its graph) comes before the generic one below.
            try:
                model.load_state_dict(saved, strict=False)
            except RuntimeError as error:
                first = " ".join(str(error).split())[:300]
                raise CheckpointError(f"{info.weights_path}: weights do not fit regressor {info.arch!r}: {first}") from None
        if missing or unexpected:
            raise CheckpointError(
                f"{info.weights_path}: weights do not fit regressor {info.arch!r}: {len(missing)} missing keys "
                f"{missing[:3]}, {len(unexpected)} unexpected or reshaped keys {unexpected[:3]}"
            )
        steps.append(int(info.meta.get("step", -1)))
        for key, value in current.items():
            if value.is_floating_point():
                total[key] = total[key] + value.double() if key in total else value.detach().double().clone()
            else:
                total[key] = value.detach().clone()
    with torch.no_grad():
        for key, value in total.items():
            current[key].copy_(value / len(sidecars) if value.is_floating_point() else value)
    return steps


def load_training_state(info: CheckpointInfo) -> dict:
    """The optimizer state and RNG states saved with the checkpoint (``{"optimizer": ..., "rng": ...}``)."""
    try:
        return torch.load(info.state_path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle/zip errors of a damaged file
        raise CheckpointError(f"{info.state_path}: unreadable training state ({type(error).__name__}: {error})") from None

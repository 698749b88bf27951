"""The MANO layer: both hands' meshes and 21 joints from MANO parameters, through smplx.

Which files: ``HandModel(mano_dir)`` loads ``MANO_RIGHT.pkl`` and ``MANO_LEFT.pkl`` from ``mano_dir``, else from
``$HANDS_MANO_DIR``, else the project's procedural MANO-format hand (:mod:`hands.procedural`), written once
into ``cache_dir()/mano_procedural/<version>-<source hash>/`` (each file atomically, so concurrent processes
do not collide). The official files pickle chumpy objects, and chumpy does not import on Python 3.11 /
numpy 2: :func:`load_mano_file` reads them with a restricted unpickler that turns every chumpy object into the
plain array it holds (a ``chumpy.ch.Ch`` keeps its value in its pickled state under ``'x'``) and refuses any
other global than numpy arrays, scipy sparse matrices and a few builtins. The plain arrays are handed to
``smplx.MANO`` as its ``data_struct`` (no cleaned copy is written anywhere).

Conventions (smplx's, i.e. MANO's):

- ``pose`` (B, 48): axis-angle, radians, root (global orientation) first, then the 15 hand joints in MANO's
  order; ``flat_hand_mean=False``: the model's ``hands_mean`` is *added* to the 45 hand values, so a zero
  pose is the relaxed, slightly curled mean hand and ``-hands_mean`` is the flat hand.
- the root rotation turns the mesh about the wrist joint of the shaped template (which is not at the
  origin: about (0.095, 0.006, 0.006) m for the official right hand and for the procedural one), and
  ``trans`` (B, 3) is added *after* posing: the posed wrist is ``J_wrist(shape) + trans``, not ``trans``.
- outputs are metres, in the model's frame (the caller's camera frame when ``trans`` and the root rotation
  put it there); ``joints`` (B, 21, 3) are in our order (hands/joints.py): MANO's 16 regressed joints plus
  the five fingertip vertices, reordered with ``MANO21_TO_OURS``.
- left-hand fix (FACTS.md §7): when the left model's shapedirs x-component nearly equals the right model's
  (sum of absolute differences < 1, the defect of the official left file), it is negated, as every major
  code base does; the NeuralAnnot fits of IH2.6M, ReIH and COCO assume the fix.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse
import torch
from torch import Tensor, nn

from hands.joints import MANO21_TO_OURS, MANO_TIP_VERTS

__all__ = [
    "MANOError",
    "MANOFilesMissing",
    "HandModel",
    "HandOutput",
    "MANO_DIR_ENV",
    "load_mano_file",
    "procedural_mano_dir",
]

MANO_DIR_ENV = "HANDS_MANO_DIR"
SIDES = ("right", "left")
_FILES = {"right": "MANO_RIGHT.pkl", "left": "MANO_LEFT.pkl"}
# key -> required shape (None: any size >= 10 for the shape-space dimension)
_REQUIRED = {
    "v_template": (778, 3),
    "f": (1538, 3),
    "shapedirs": (778, 3, None),
    "posedirs": (778, 3, 135),
    "J_regressor": (16, 778),
    "weights": (778, 16),
    "kintree_table": (2, 16),
    "hands_components": (45, 45),
    "hands_mean": (45,),
}


class MANOError(ValueError):
    """MANO files that cannot be used (not a MANO pickle, wrong shapes, NaN / inf values), in one line naming
    the file. Command lines report it as a usage error."""


class MANOFilesMissing(MANOError, FileNotFoundError):
    """A MANO folder that does not exist or lacks MANO_RIGHT.pkl / MANO_LEFT.pkl (one line naming it)."""


# ----------------------------------------------------------------------------------------------------------
# chumpy-free loading


class _ChumpyObject:
    """Stand-in for any chumpy class met while unpickling: keeps the pickled state to rebuild an array."""

    chumpy_class = "chumpy"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):  # protocol-0 pickles may call the class
        self._state = None

    def __setstate__(self, state):
        self._state = state

    def to_array(self, where: str) -> np.ndarray:
        state = self._state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = {**state[0], **(state[1] or {})}
        if isinstance(state, dict) and "x" in state:
            value = state["x"]
            if isinstance(value, _ChumpyObject):
                return value.to_array(where)
            return np.asarray(value)
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"{where}: chumpy object {self.chumpy_class} holds no plain array (state keys {keys}); "
            "only terminal chumpy.Ch values can be read without chumpy"
        )


_STANDINS: dict[str, type] = {}


def _chumpy_standin(module: str, name: str) -> type:
    path = f"{module}.{name}"
    if path not in _STANDINS:
        _STANDINS[path] = type(name, (_ChumpyObject,), {"chumpy_class": path})
    return _STANDINS[path]


def _numpy_global(module: str, name: str):
    import numpy._core.multiarray as multiarray  # numpy >= 2 location of the pickling helpers
    import numpy._core.numeric as numeric

    table = {
        ("multiarray", "_reconstruct"): multiarray._reconstruct,
        ("multiarray", "scalar"): multiarray.scalar,
        ("numeric", "_frombuffer"): numeric._frombuffer,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    return table.get((module.rsplit(".", 1)[-1], name))


class _MANOUnpickler(pickle.Unpickler):
    """Unpickles MANO files without chumpy: chumpy classes become :class:`_ChumpyObject` stand-ins; only
    numpy arrays, scipy sparse matrices and plain builtins are allowed besides."""

    _SPARSE = {"csc_matrix", "csr_matrix", "coo_matrix", "csc_array", "csr_array", "coo_array"}
    _BUILTINS = {"object", "set", "frozenset", "dict", "list", "tuple", "complex", "bytearray", "slice"}

    def find_class(self, module, name):
        if module == "chumpy" or module.startswith("chumpy."):
            return _chumpy_standin(module, name)
        if module.startswith("numpy"):
            found = _numpy_global(module, name)
            if found is not None:
                return found
        if module.startswith("scipy.sparse") and name in self._SPARSE:
            return getattr(scipy.sparse, name)
        if module in ("copyreg", "copy_reg") and name == "_reconstructor":
            import copyreg

            return copyreg._reconstructor
        if module in ("builtins", "__builtin__") and name in self._BUILTINS:
            import builtins

            return getattr(builtins, name)
        if module == "_codecs" and name == "encode":
            import codecs

            return codecs.encode
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a MANO file")


def _plain(value, where: str):
    if isinstance(value, _ChumpyObject):
        return value.to_array(where)
    if scipy.sparse.issparse(value):
        try:
            return scipy.sparse.csc_matrix(value)
        except Exception:  # a matrix pickled by an old scipy whose other attributes differ: rebuild it
            state = vars(value)
            shape = state.get("_shape", state.get("shape"))
            cls = scipy.sparse.csr_matrix if value.__class__.__name__.startswith("csr") else scipy.sparse.csc_matrix
            return scipy.sparse.csc_matrix(cls((state["data"], state["indices"], state["indptr"]), shape=shape))
    return value


def load_mano_file(path: str | os.PathLike) -> dict:
    """Read a MANO ``.pkl`` (official, chumpy-pickled, or procedural) into plain numpy arrays.

    Returns a dict with at least the keys of ``_REQUIRED`` (numpy arrays; ``J_regressor`` as a
    ``scipy.sparse.csc_matrix``), validated against MANO's shapes and finite. Raises :class:`MANOError` (a
    ValueError) with a one-line message naming the file and what is wrong (not a pickle, not a dict, missing
    keys, wrong shapes, NaN or inf values), :class:`MANOFilesMissing` when the file does not exist.
    """
    path = Path(path)
    try:
        data = _MANOUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except FileNotFoundError:
        raise MANOFilesMissing(f"{path}: no such MANO file") from None
    except IsADirectoryError:
        raise MANOError(f"{path}: a folder, not a MANO model file") from None
    except Exception as err:  # any unpickling failure: not a MANO pickle
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise MANOError(f"{path}: not a MANO model file (cannot unpickle it: {msg})") from None
    if not isinstance(data, dict):
        raise MANOError(f"{path}: not a MANO model file (the pickle holds a {type(data).__name__}, not a dict)")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise MANOError(f"{path}: not a MANO model file: missing keys {missing}")
    try:
        out = {k: _plain(v, f"{path} key '{k}'") for k, v in data.items()}
    except MANOError:
        raise
    except Exception as err:  # a chumpy object without an array, a malformed sparse matrix
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise MANOError(f"{path}: not a MANO model file ({msg})") from None
    for key, want in _REQUIRED.items():
        value = out[key]
        shape = tuple(value.shape) if hasattr(value, "shape") else None
        ok = shape is not None and len(shape) == len(want) and all(
            (w is None and s >= 10) or s == w for s, w in zip(shape, want)
        )
        if not ok:
            need = tuple("10+" if w is None else w for w in want)
            raise MANOError(f"{path}: not a MANO model file: '{key}' has shape {shape}, MANO needs {need}")
        try:
            out[key] = scipy.sparse.csc_matrix(value) if key == "J_regressor" else np.asarray(value)  # dense or sparse
            numbers = out[key].data if key == "J_regressor" else out[key]
            finite = bool(np.isfinite(np.asarray(numbers, dtype=np.float64)).all())
        except (TypeError, ValueError):
            raise MANOError(f"{path}: not a MANO model file: '{key}' is not numeric") from None
        if not finite:  # refused before anything (a rendered benchmark, a cache) is made from it
            raise MANOError(f"{path}: '{key}' holds NaN or inf values; these MANO files are damaged")
    faces = out["f"]
    if faces.min() < 0 or faces.max() >= 778 or not np.array_equal(faces, np.round(faces)):
        raise MANOError(f"{path}: 'f' holds values outside the 778 vertex indices; these MANO files are damaged")
    parents = out["kintree_table"][0, 1:]
    if parents.min() < 0 or parents.max() >= 16:
        raise MANOError(f"{path}: 'kintree_table' names parents outside the 16 joints; these MANO files are damaged")
    return out


def procedural_mano_dir() -> Path:
    """The cache folder of the procedural files, written there on first use (atomically, file by file).

    The folder name carries the generator's version and a hash of its source, so a changed generator never
    reuses stale files."""
    from hands import procedural
    from hands.paths import cache_dir

    source = Path(procedural.__file__).read_bytes()
    tag = f"v{procedural.PROCEDURAL_VERSION}-{hashlib.sha256(source).hexdigest()[:12]}"
    folder = cache_dir() / "mano_procedural" / tag
    if not all((folder / name).is_file() for name in _FILES.values()):
        procedural.write_procedural_mano(folder)
    return folder


# ----------------------------------------------------------------------------------------------------------
# the layer


@dataclass
class HandOutput:
    """verts (B, 778, 3) and joints (B, 21, 3, our order), metres, in the frame set by pose and trans."""

    verts: Tensor
    joints: Tensor


def _full_precision(device: torch.device):
    """A block with autocast off on ``device`` when it is on there (else a no-op context)."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _smplx_layer(data: dict, path: Path, is_right: bool) -> nn.Module:
    import smplx
    from smplx.utils import Struct

    struct = Struct(**data)
    with contextlib.redirect_stdout(io.StringIO()):  # smplx prints a notice about 10 shape coefficients
        layer = smplx.MANO(
            str(path),
            is_rhand=is_right,
            data_struct=struct,
            use_pca=False,
            flat_hand_mean=False,
            num_betas=10,
            create_global_orient=False,
            create_hand_pose=False,
            create_betas=False,
            create_transl=False,
            create_body_pose=False,
        )
    # keep the model's arrays out of state_dict: a checkpoint of a module that holds a HandModel must not
    # carry (licence-restricted) MANO data and must load whichever MANO files are present
    for module in layer.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            module.register_buffer(name, buffer, persistent=False)
    # smplx walks the kinematic chain with ``parents[i]`` per joint: a device buffer costs one host sync per
    # joint on an accelerator. The (16,) index stays a plain CPU attribute (not moved by .to(device)).
    parents = layer.parents
    del layer._buffers["parents"]
    layer.parents = parents.cpu()
    return layer


class HandModel(nn.Module):
    """Both MANO hands through smplx (see the module docstring for files and conventions).

    ``model(side, pose (B, 48), shape (B, 10), trans=None (B, 3)) -> HandOutput`` with ``verts``
    (B, 778, 3) and ``joints`` (B, 21, 3) in metres, our joint order. Buffers follow ``.to(device)``:
    ``faces`` (1538, 3) long (right hand; ``faces_for(side)``), ``j_regressor`` (16, 778) float (right hand,
    row 0 = wrist; ``j_regressor_for(side)``), ``tip_verts`` (5,) long (thumb, index, middle, ring, pinky).
    No buffer is persistent: ``state_dict()`` is empty, so a module holding a HandModel can be checkpointed
    without MANO data and reloaded with other MANO files.
    """

    def __init__(self, mano_dir: str | os.PathLike | None = None):
        super().__init__()
        if mano_dir is None and os.environ.get(MANO_DIR_ENV):
            mano_dir = os.environ[MANO_DIR_ENV]
        folder = Path(mano_dir).expanduser() if mano_dir is not None else procedural_mano_dir()
        self.mano_dir = folder
        if folder.exists() and not folder.is_dir():
            raise MANOFilesMissing(f"{folder}: a file, not a MANO folder (point --mano-dir or ${MANO_DIR_ENV} at the "
                                   "folder holding MANO_RIGHT.pkl and MANO_LEFT.pkl)")
        paths = {side: folder / _FILES[side] for side in SIDES}
        for side, path in paths.items():
            if not path.is_file():
                raise MANOFilesMissing(
                    f"{path}: no {_FILES[side]} in {folder} (point --mano-dir or ${MANO_DIR_ENV} at the folder "
                    "holding MANO_RIGHT.pkl and MANO_LEFT.pkl)"
                )
        raw = {side: paths[side].read_bytes() for side in SIDES}
        data = {side: load_mano_file(paths[side]) for side in SIDES}
        self.paths = paths
        self._fingerprint = hashlib.sha256(raw["right"] + raw["left"]).hexdigest()
        from hands.procedural import MODEL_SOURCE

        self.is_procedural = all(str(data[s].get("model_source", "")) == MODEL_SOURCE for s in SIDES)
        try:
            self.layers = nn.ModuleDict({side: _smplx_layer(data[side], paths[side], side == "right") for side in SIDES})
        except (IndexError, KeyError, TypeError, ValueError, RuntimeError) as err:  # e.g. a kinematic tree out of range
            msg = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise MANOError(f"{folder}: smplx cannot build MANO from these files ({type(err).__name__}: {msg})") from None
        # left-hand shapedirs fix (FACTS.md §7)
        right_sd, left_sd = self.layers["right"].shapedirs, self.layers["left"].shapedirs
        self.left_shapedirs_fixed = bool(torch.sum(torch.abs(left_sd[:, 0, :] - right_sd[:, 0, :])) < 1)
        if self.left_shapedirs_fixed:
            left_sd[:, 0, :] *= -1
        tips = data["right"].get("fingertip_verts", MANO_TIP_VERTS)
        self.register_buffer("tip_verts", torch.as_tensor(np.asarray(tips), dtype=torch.long), persistent=False)
        self.register_buffer("_order", torch.as_tensor(MANO21_TO_OURS, dtype=torch.long), persistent=False)
        for side in SIDES:
            faces = torch.as_tensor(np.asarray(data[side]["f"], dtype=np.int64))
            reg = torch.as_tensor(np.asarray(data[side]["J_regressor"].toarray(), dtype=np.float32))
            self.register_buffer(f"faces_{side}", faces, persistent=False)
            self.register_buffer(f"j_regressor_{side}", reg, persistent=False)

    # -- metadata --------------------------------------------------------------------------------------
    @property
    def faces(self) -> Tensor:
        """(1538, 3) long, the right hand's faces."""
        return self.faces_right

    def faces_for(self, side: str) -> Tensor:
        """(1538, 3) long faces of ``side`` (the left file's winding is the mirror of the right's)."""
        return getattr(self, f"faces_{_check_side(side)}")

    @property
    def j_regressor(self) -> Tensor:
        """(16, 778) float, the right hand's joint regressor; row 0 = wrist."""
        return self.j_regressor_right

    def j_regressor_for(self, side: str) -> Tensor:
        return getattr(self, f"j_regressor_{_check_side(side)}")

    def hands_mean_for(self, side: str) -> Tensor:
        """(45,) the mean hand pose added to the 45 hand values (flat_hand_mean=False)."""
        return self.layers[_check_side(side)].hand_mean

    def fingerprint(self) -> str:
        """sha256 of the two model files (right bytes then left bytes), hex."""
        return self._fingerprint

    def extra_repr(self) -> str:
        kind = "procedural" if self.is_procedural else "files"
        return f"mano_dir={str(self.mano_dir)!r}, {kind}, fingerprint={self._fingerprint[:12]}"

    # -- forward ---------------------------------------------------------------------------------------
    def forward(self, side: str, pose: Tensor, shape: Tensor, trans: Tensor | None = None) -> HandOutput:
        """side: "right" | "left"; pose: (B, 48) axis-angle, root first (hands_mean added); shape: (B, 10);
        trans: (B, 3) metres added after posing, or None. Returns verts (B, 778, 3), joints (B, 21, 3)."""
        layer = self.layers[_check_side(side)]
        if pose.dim() != 2 or pose.shape[1] != 48:
            raise ValueError(f"pose must be (B, 48) axis-angle, got {tuple(pose.shape)}")
        batch = pose.shape[0]
        if shape.shape != (batch, 10):
            raise ValueError(f"shape must be ({batch}, 10), got {tuple(shape.shape)}")
        if trans is not None and trans.shape != (batch, 3):
            raise ValueError(f"trans must be ({batch}, 3), got {tuple(trans.shape)}")
        dtype = layer.shapedirs.dtype
        with _full_precision(pose.device):  # the mesh in full precision under mixed precision
            out = layer(
                betas=shape.to(dtype),
                global_orient=pose[:, :3].to(dtype),
                hand_pose=pose[:, 3:].to(dtype),
                transl=None if trans is None else trans.to(dtype),
            )
        verts = out.vertices  # (B, 778, 3)
        joints = torch.cat([out.joints, verts[:, self.tip_verts]], dim=1)  # (B, 21, 3) MANO order + tips
        return HandOutput(verts=verts, joints=joints[:, self._order])


    def regress_joints(self, side: str, verts: Tensor) -> Tensor:
        """Joints regressed from a posed mesh: verts (..., 778, 3) of ``side`` -> (..., 21, 3), our order, same
        frame and units: MANO's joint regressor applied to the mesh (16 joints) plus the five tip vertices.

        This is InterWild's joint definition (``get_coord`` with ``mano.sh_joint_regressor``) and the one the
        metrics align meshes with (row 0, the wrist). It differs from :meth:`forward`'s ``joints`` (smplx's
        LBS joints, whose wrist is the root rotation's centre) by about 0.4-0.6 mm on average and several mm at
        some poses; predictions and synthesised labels use this one.
        """
        regressor = self.j_regressor_for(side).to(verts)  # (16, 778), the verts' dtype and device
        regressed = torch.einsum("jv,...vc->...jc", regressor, verts)  # (..., 16, 3)
        tips = verts[..., self.tip_verts, :]  # (..., 5, 3)
        return torch.cat([regressed, tips], -2)[..., self._order, :]


def _check_side(side: str) -> str:
    if side not in SIDES:
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    return side

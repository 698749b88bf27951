"""A CPU stand-in for one CUDA device, to check the project's GPU code paths in ``make test`` (no GPU needed).

Inside :func:`fake_cuda`, ``torch.cuda`` claims one device; a tensor moved to ``cuda`` (or made there) becomes an
:class:`Accel`: a wrapper whose storage device is ``meta`` and whose data lives in a CPU tensor inside, so every
op really runs (on the CPU) and is checked on the way. Streams and events are fakes that keep vector clocks.
What it records (``FakeCuda.events``, ``kind -> Counter(call site)``; call sites are project ``file:line``):

- ``mismatch``: an op mixing accelerator tensors with CPU tensors of dim > 0 (raises on a GPU);
- ``cpu0d``: a CPU 0-dim tensor in a non-pointwise op with accelerator tensors (raises for most ops);
- ``generator``: an accelerator factory or op given a CPU ``torch.Generator`` (raises);
- ``sync``: a host synchronisation (``.item()``, ``bool()``, ``.tolist()``, ``.cpu()``, ``nonzero``, boolean-mask
  indexing, linalg error checks, ...), per thread in ``FakeCuda.syncs``;
- ``race``: a read (or write) of memory last written on another stream with nothing ordering the two;
- ``xstream``: memory allocated on one stream used on another without ``record_stream`` (the caching
  allocator could hand it out again while the other stream still reads it).

It does not model timing, the caching allocator itself, NCCL or half-precision kernels: a clean report is
necessary, not sufficient (``make gpu-check`` runs the real thing).
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import os
import threading
import traceback
from unittest import mock

import torch
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
CUDA0 = torch.device("cuda", 0)  # "cuda" without an index would ask the (absent) driver for the current device
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_SYNC_OPS = {
    aten._local_scalar_dense.default,
    aten.is_nonzero.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.equal.default,
    aten.bincount.default,
    aten._unique2.default,
    aten._linalg_check_errors.default,
}
_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


def _site() -> str:
    frames = [
        f for f in traceback.extract_stack()[:-2]
        if f.filename.startswith(ROOT) and os.sep + "tests" + os.sep not in f.filename[len(ROOT) - 1:]
    ]
    return " <- ".join(f"{os.path.relpath(f.filename, ROOT)}:{f.lineno}" for f in reversed(frames[-3:])) or "?"


class _Clock:
    """Vector clocks of the fake streams and of what the host has seen complete."""

    def __init__(self):
        self.lock = threading.RLock()
        self.ids = itertools.count()
        self.streams: list = []
        self.host = collections.Counter()  # stream id -> last op the host knows finished

    @staticmethod
    def merge(into, other) -> None:
        for k, v in other.items():
            if v > into[k]:
                into[k] = v


class Accel(torch.Tensor):
    """A tensor that claims to be on the accelerator (storage device ``meta``); ``elem`` holds the data."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        out = torch.Tensor._make_wrapper_subclass(
            cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=torch.device("meta"), requires_grad=elem.requires_grad)
        out.elem = elem
        return out

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _ACTIVE.handle(func, args, kwargs or {})

    def __repr__(self, *, tensor_contents=None):
        return f"Accel({self.elem!r})"

    def _index(self, idx):
        # a Python list index becomes a tensor on self's device (meta: no data); build it on the CPU
        if isinstance(idx, list):
            return torch.tensor(idx)
        if isinstance(idx, tuple):
            return tuple(self._index(i) for i in idx)
        return idx

    def __getitem__(self, idx):
        return super().__getitem__(self._index(idx))

    def __setitem__(self, idx, value):
        return super().__setitem__(self._index(idx), value)

    def tolist(self):
        _ACTIVE.read(self.elem, "tolist")
        _ACTIVE.sync("tolist")
        return self.elem.tolist()

    def numpy(self, *args, **kwargs):
        _ACTIVE.note("mismatch", "numpy() of an accelerator tensor")
        return self.elem.numpy(*args, **kwargs)

    def record_stream(self, stream) -> None:
        rec = _ACTIVE.memory.get(_key(self.elem))
        if rec is not None:
            rec["recorded"].add(stream.sid)

    def pin_memory(self, *args, **kwargs):
        return self


def _key(t: torch.Tensor):
    try:
        return t.untyped_storage().data_ptr() if t.numel() else None
    except (RuntimeError, NotImplementedError):
        return None


_ACTIVE: "FakeCuda"


class FakeCuda:
    """The state of one fake device; use through :func:`fake_cuda`."""

    def __init__(self):
        self.clock = _Clock()
        self.events: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.syncs: collections.Counter = collections.Counter()  # thread name -> host syncs
        self.memory: dict = {}  # storage key -> {"alloc": sid, "write": (sid, seq), "readers": {}, "recorded": set}
        self.accel_generators: set = set()
        self.Stream = self._stream_class()
        self.default = self.Stream(name="default")
        self.tls = threading.local()

    # -- streams ---------------------------------------------------------------------------------------------
    def _stream_class(self):
        fake = self

        class Stream:
            def __init__(self, device=None, priority=0, name=None, **_):
                with fake.clock.lock:
                    self.sid = next(fake.clock.ids)
                    fake.clock.streams.append(self)
                self.name, self.priority = name or f"stream{self.sid}", priority
                self.cuda_stream = 0x1000 + self.sid  # a handle, as memory_snapshot's segments name it
                self.vc = collections.Counter()
                self.device, self.device_index = torch.device("cuda", 0), 0

            def wait_event(self, event):
                if event.vc is None:
                    fake.note("race", "wait on an event that was never recorded")
                    return
                with fake.clock.lock:
                    fake.clock.merge(self.vc, event.vc)

            def wait_stream(self, other):
                with fake.clock.lock:
                    fake.clock.merge(self.vc, other.vc)

            def record_event(self, event=None):
                event = event or fake.Event()
                event.record(self)
                return event

            def synchronize(self):
                with fake.clock.lock:
                    fake.clock.merge(fake.clock.host, self.vc)

            def query(self):
                return True

            def __enter__(self):
                self._prev = fake.current()
                fake.tls.stream = self
                return self

            def __exit__(self, *exc):
                fake.tls.stream = self._prev

        return Stream

    def Event(self, *args, **kwargs):
        fake = self

        class Event:
            def __init__(self):
                self.vc = None

            def record(self, stream=None):
                stream = stream or fake.current()
                with fake.clock.lock:
                    self.vc = collections.Counter(stream.vc)

            def wait(self, stream=None):
                (stream or fake.current()).wait_event(self)

            def synchronize(self):
                if self.vc is not None:
                    with fake.clock.lock:
                        fake.clock.merge(fake.clock.host, self.vc)

            def query(self):
                return True

            def elapsed_time(self, other):
                return 0.0

        return Event()

    def current(self):
        return getattr(self.tls, "stream", self.default)

    @contextlib.contextmanager
    def stream_ctx(self, stream):
        prev = self.current()
        self.tls.stream = stream if stream is not None else prev
        try:
            yield stream
        finally:
            self.tls.stream = prev

    def device_sync(self, *args, **kwargs):
        with self.clock.lock:
            for s in self.clock.streams:
                self.clock.merge(self.clock.host, s.vc)

    # -- bookkeeping -----------------------------------------------------------------------------------------
    def note(self, kind: str, detail: str = "") -> None:
        with self.clock.lock:
            self.events[kind][f"{_site()} [{detail}]"] += 1

    def sync(self, detail: str) -> None:
        self.note("sync", detail)
        with self.clock.lock:
            self.syncs[threading.current_thread().name] += 1
            self.clock.merge(self.clock.host, self.current().vc)

    def tick(self) -> int:
        s = self.current()
        with self.clock.lock:
            self.clock.merge(s.vc, self.clock.host)
            s.vc[s.sid] += 1
            return s.vc[s.sid]

    def _ordered(self, sid: int, seq: int, s) -> bool:
        return sid == s.sid or s.vc[sid] >= seq or self.clock.host[sid] >= seq

    def read(self, t: torch.Tensor, what: str) -> None:
        rec = self.memory.get(_key(t))
        if rec is None:
            return
        s = self.current()
        if not self._ordered(*rec["write"], s):
            self.note("race", f"{what} reads data written on another stream")
        if rec["alloc"] != s.sid and s.sid not in rec["recorded"]:
            self.note("xstream", f"{what} on {s.name}")
        rec["readers"][s.sid] = s.vc[s.sid]

    def write(self, t: torch.Tensor, seq: int, new: bool, what: str) -> None:
        key = _key(t)
        if key is None:
            return
        s = self.current()
        rec = self.memory.get(key)
        if new or rec is None:
            self.memory[key] = {"alloc": s.sid, "write": (s.sid, seq), "readers": {}, "recorded": set()}
            return
        if not self._ordered(*rec["write"], s) or not all(self._ordered(r, q, s) for r, q in rec["readers"].items()):
            self.note("race", f"{what} overwrites data used on another stream")
        if rec["alloc"] != s.sid and s.sid not in rec["recorded"]:
            self.note("xstream", f"{what} on {s.name}")
        rec["write"] = (s.sid, seq)

    # -- the op handler --------------------------------------------------------------------------------------
    @staticmethod
    def is_accel_device(device) -> bool:
        if device is None:
            return False
        try:
            return torch.device(device).type in ("cuda", "meta")
        except (RuntimeError, TypeError):
            return False

    def handle(self, func, args, kwargs):
        flat = tree_flatten((args, kwargs))[0]
        accel = [x for x in flat if isinstance(x, Accel)]
        if not accel and not self.is_accel_device(kwargs.get("device")):
            return func(*args, **kwargs)
        name = str(func)
        if func is aten._to_copy.default:
            return self.copy(args[0], kwargs, name)
        for plain in (x for x in flat if isinstance(x, torch.Tensor) and not isinstance(x, Accel)):
            if plain.dim() > 0 and func not in _INDEX_OPS:
                self.note("mismatch", f"{name} with a CPU tensor of shape {tuple(plain.shape)}")
            elif plain.dim() == 0 and torch.Tag.pointwise not in func.tags and func not in _INDEX_OPS | {aten.copy_.default}:
                self.note("cpu0d", name)
        gen = kwargs.get("generator")
        if gen is not None and id(gen) not in self.accel_generators:
            self.note("generator", f"{name} with a CPU torch.Generator")
        for x in accel:
            self.read(x.elem, name)

        def unwrap(x):
            if isinstance(x, Accel):
                return x.elem
            if isinstance(x, torch.device) and x.type in ("cuda", "meta"):
                return torch.device("cpu")
            if isinstance(x, str) and self.is_accel_device(x):
                return torch.device("cpu")
            return x

        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        if func in _SYNC_OPS:
            self.sync(name)
        if func in _INDEX_OPS and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []) if i is not None
        ):
            self.sync(f"{name} with a boolean mask")
        seq = self.tick()
        for i, arg in enumerate(func._schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                value = args[i] if i < len(args) else kwargs.get(arg.name)
                for v in tree_flatten(value)[0]:
                    if isinstance(v, Accel):
                        self.write(v.elem, seq, False, name)
        inputs = {id(x.elem): x for x in accel}
        input_keys = {_key(x.elem) for x in accel}

        def wrap(o):
            if isinstance(o, torch.Tensor) and not isinstance(o, Accel):
                if id(o) in inputs:
                    return inputs[id(o)]
                self.write(o, seq, _key(o) not in input_keys, name)
                return Accel(o)
            return o

        return tree_map(wrap, out)

    def copy(self, x, kwargs, name):
        target = kwargs.get("device")
        kw = dict(kwargs)
        kw.pop("device", None)
        if isinstance(x, Accel):
            self.read(x.elem, name)
            if target is not None and torch.device(target).type == "cpu":
                self.tick()
                self.sync("copy to the host")
                return aten._to_copy.default(x.elem, **kw)
            out = aten._to_copy.default(x.elem, **kw)
        else:  # host -> device
            out = aten._to_copy.default(x, **kw)
            if out is x:
                out = x.clone()
            if not kwargs.get("non_blocking", False):
                self.note("h2d", f"blocking copy of {tuple(x.shape)}")
        seq = self.tick()
        self.write(out, seq, True, name)
        return Accel(out)


class _Mode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _ACTIVE.handle(func, args, kwargs or {})


@contextlib.contextmanager
def fake_cuda():
    """Run the block with a fake CUDA device (see the module docstring); yields the :class:`FakeCuda`."""
    global _ACTIVE
    fake = _ACTIVE = FakeCuda()
    real_generator, real_run = torch.Generator, threading.Thread.run
    real_tensor, real_as_tensor, real_new_tensor = torch.tensor, torch.as_tensor, torch.Tensor.new_tensor

    class Generator(real_generator):
        def __new__(cls, device="cpu"):
            gen = super().__new__(cls, "cpu")
            if fake.is_accel_device(device):
                fake.accel_generators.add(id(gen))
            return gen

    def factory(real):
        def make(data, *args, **kwargs):
            if fake.is_accel_device(kwargs.get("device")):
                kwargs = dict(kwargs)
                kwargs.pop("device")
                if isinstance(data, Accel):
                    return real(data, *args, **kwargs)
                return real(data, *args, **kwargs).to(CUDA0)
            return real(data, *args, **kwargs)

        return make

    def new_tensor(self, data, dtype=None, device=None, requires_grad=False):
        device = device if device is not None else (CUDA0 if isinstance(self, Accel) else self.device)
        out = real_new_tensor(torch.empty((), dtype=dtype or self.dtype), data, dtype=dtype or self.dtype)
        out = out.to(CUDA0 if fake.is_accel_device(device) else device)
        return out.requires_grad_(requires_grad) if requires_grad else out

    def run(thread):
        with _Mode():
            real_run(thread)

    cuda = torch.cuda
    patches = {
        (cuda, "is_available"): lambda: True,
        (cuda, "device_count"): lambda: 1,
        (cuda, "current_device"): lambda: 0,
        (cuda, "set_device"): lambda device: None,
        (cuda, "_lazy_init"): lambda: None,
        (cuda, "is_bf16_supported"): lambda *a, **k: True,
        (cuda, "get_device_capability"): lambda *a, **k: (9, 0),
        (cuda, "get_device_name"): lambda *a, **k: "fake CUDA (tests/fake_cuda.py)",
        (cuda, "synchronize"): fake.device_sync,
        (cuda, "Stream"): fake.Stream,
        (cuda, "Event"): fake.Event,
        (cuda, "stream"): fake.stream_ctx,
        (cuda, "current_stream"): lambda device=None: fake.current(),
        (cuda, "default_stream"): lambda device=None: fake.default,
        (cuda, "get_rng_state_all"): lambda: [],
        (cuda, "set_rng_state_all"): lambda states: None,
        (cuda, "memory_allocated"): lambda *a: 0,
        (cuda, "max_memory_allocated"): lambda *a: 0,
        (cuda, "reset_peak_memory_stats"): lambda *a: None,
        (cuda, "empty_cache"): lambda: None,
        (cuda, "memory_snapshot"): lambda *a, **k: [],
        (torch, "Generator"): Generator,
        (torch, "tensor"): factory(real_tensor),
        (torch, "as_tensor"): factory(real_as_tensor),
        (torch.Tensor, "new_tensor"): new_tensor,
        (torch.Tensor, "record_stream"): Accel.record_stream,
        (torch.Tensor, "pin_memory"): lambda self, *a, **k: self.clone(),
        (threading.Thread, "run"): run,
        (torch.optim.Optimizer, "_accelerator_graph_capture_health_check"): lambda self: None,
    }
    # Module.to() would otherwise assign ``param.data``, which replaces a wrapper's metadata but not its ``elem``
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        with contextlib.ExitStack() as stack:
            for (owner, attr), value in patches.items():
                stack.enter_context(mock.patch.object(owner, attr, value, create=True))
            stack.enter_context(_Mode())
            yield fake
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)


def report(fake: FakeCuda, kinds=("mismatch", "cpu0d", "generator", "race", "xstream")) -> str:
    """The recorded events of ``kinds``, one line per call site (empty when there are none)."""
    return "\n".join(f"{kind}: {n} x {site}" for kind in kinds for site, n in fake.events[kind].most_common())

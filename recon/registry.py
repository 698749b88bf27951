"""The regressor registry: one name -> one regressor class.

Contract of a regressor (what :func:`build_regressor` checks and what ``recon.train`` / ``recon.test`` rely on):

- It is a ``torch.nn.Module`` whose constructor takes keyword arguments only, each with a type annotation
  and a default (``recon.config`` turns these into a strict config section: an unknown key or a wrong
  type fails naming it). The same keyword arguments are written into every checkpoint, so that
  ``recon.test`` rebuilds the model with ``build_regressor(name, **kwargs)``.
- ``forward(batch: hands.sample.HandBatch) -> recon.output.TwoHandOutput``: vertices (B, 778, 3) and
  joints (B, 21, 3) of both hands in camera axes relative to each hand's own wrist, metres, and
  ``rel_root`` (B, 3), left wrist minus right wrist, metres. The batch's images are (B, 3, H, W) in [0, 1].
- ``losses(output, batch) -> dict[str, Tensor]``: named scalar loss terms, each already weighted; the
  trainer minimises their sum and logs each one. Terms must respect the batch's validity masks.
- Optional: ``visualize_meshes`` is not part of the contract; the trainer draws predictions from the
  ``TwoHandOutput`` alone.
- Optional: a class attribute ``input_crop`` ("image", "hands" or "verts") states the input its reference reads;
  ``recon.data.check_input_protocol`` then refuses runs and test sets with another ``data.crop``.
- Optional: ``protocol_evaluator()`` returns an evaluator (``process(output, batch)`` / ``evaluate() -> dict``)
  of the regressor's own paper's protocol, which ``recon.evaluate`` reports beside the common metrics.

Regressors register themselves at import with ``@REGRESSORS.register("name")``. The built-in ones are
imported by one visible list in :mod:`recon.archs`; a user's own module is imported with
``--plugin MODULE_OR_FILE.py`` (see :func:`import_plugin` and docs/new-regressor.md).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
import traceback
from pathlib import Path
from typing import Callable, Generic, Iterator, Optional, TypeVar

from torch import nn

__all__ = ["Registry", "PluginError", "REGRESSORS", "build_regressor", "import_plugin", "load_builtin_regressors"]

T = TypeVar("T")


class Registry(Generic[T]):
    """A named map from strings to objects (here: classes), filled by a decorator.

    >>> MODELS = Registry("model")
    >>> @MODELS.register("tiny")
    ... class Tiny: ...
    >>> MODELS.get("tiny") is Tiny
    True
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("name")``. A name can be registered once only."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.name} registry: a name must be a non-empty string, got {name!r}")

        def decorator(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise KeyError(
                    f"{self.name} {name!r} is already registered (by {_qualname(self._items[name])}); "
                    f"pick another name for {_qualname(obj)}"
                )
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        """The object registered as ``name``; an unknown name raises KeyError listing the known ones."""
        if name not in self._items:
            known = ", ".join(self.names()) or "(none)"
            raise KeyError(f"unknown {self.name} {name!r}; known: {known}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.name!r}, {self.names()})"


def _qualname(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


class PluginError(ValueError):
    """A --plugin that cannot be found or imported (one line)."""


REGRESSORS: Registry[type[nn.Module]] = Registry("regressor")
REGRESSORS.__doc__ = __doc__


def load_builtin_regressors() -> None:
    """Import :mod:`recon.archs`, whose import list registers the built-in regressors."""
    importlib.import_module("recon.archs")


def build_regressor(name: str, **kwargs) -> nn.Module:
    """Build the regressor registered as ``name`` with keyword arguments, and check the contract.

    Raises KeyError for an unknown name (listing the known ones), TypeError when the constructor rejects
    an argument or the object built breaks the contract.
    """
    load_builtin_regressors()
    cls = REGRESSORS.get(name)
    try:
        model = cls(**kwargs)
    except TypeError as error:
        raise TypeError(f"regressor {name!r} ({_qualname(cls)}): {error}") from error
    if not isinstance(model, nn.Module):
        raise TypeError(f"regressor {name!r} built a {type(model).__name__}, not a torch.nn.Module")
    for method in ("forward", "losses"):
        if not callable(getattr(model, method, None)):
            raise TypeError(f"regressor {name!r} ({_qualname(cls)}) has no {method}() method")
    params = list(inspect.signature(model.losses).parameters)
    if len(params) < 2:
        raise TypeError(f"regressor {name!r}: losses() must take (output, batch), takes ({', '.join(params)})")
    return model


def _where(error: BaseException, path: Optional[Path] = None) -> str:
    """`` (file.py, line N)``: where in the user's code an import failed (a SyntaxError's own position, else
    the innermost frame in ``path``, else the innermost frame)."""
    if isinstance(error, SyntaxError) and error.filename:
        return f" ({error.filename}, line {error.lineno})"
    frames = traceback.extract_tb(error.__traceback__)
    if path is not None:
        frames = [f for f in frames if Path(f.filename).resolve() == path.resolve()] or frames
    return f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""


def import_plugin(spec: str) -> None:
    """Import a user module that registers regressors: a module name (``my_pkg.my_regressor``) or the path
    of a ``.py`` file. Raises PluginError with one line when it cannot be found."""
    path = Path(spec)
    if spec.endswith(".py") or path.is_file():
        if not path.is_file():
            raise PluginError(f"--plugin {spec}: no such file")
        digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
        module_name = f"recon_plugin_{path.stem}_{digest}"
        if module_name in sys.modules:
            return
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise PluginError(f"--plugin {spec}: not an importable Python file")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as error:  # the user's code failed: one line with the file and line where it did
            del sys.modules[module_name]
            raise PluginError(f"--plugin {spec}: importing it failed{_where(error, path)}: "
                              f"{type(error).__name__}: {' '.join(str(error).split())[:300]}") from error
        except BaseException:
            del sys.modules[module_name]
            raise
        return
    try:
        importlib.import_module(spec)
    except ModuleNotFoundError as error:
        if error.name and spec.startswith(error.name):
            raise PluginError(f"--plugin {spec}: no module named {error.name!r} (give a module name or a .py path)") from error
        raise PluginError(f"--plugin {spec}: importing it failed: {type(error).__name__}: {error}") from error
    except Exception as error:  # the user's module failed at import
        raise PluginError(f"--plugin {spec}: importing it failed{_where(error)}: "
                          f"{type(error).__name__}: {' '.join(str(error).split())[:300]}") from error

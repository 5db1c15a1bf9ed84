"""Run a function right after a module is imported, without importing it.

```python
from transparent_dist.runtime import import_hook
import_hook.when_imported("json", lambda module: print("json is here"))
import json   # prints "json is here" (at once if json was imported already)
```

This is how `import transparent_dist` can come before `import keras` (or
without it, under `python -m transparent_dist`) and still patch Keras: the
patches are applied when the script imports it.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

__all__ = ["around_import", "remove", "when_imported"]

_CALLBACKS: dict[str, list[Callable[[ModuleType], None]]] = {}
# Context managers entered while a module's own code runs.
_AROUND: dict[str, list[Callable[[], Any]]] = {}
_LOCK = threading.RLock()
_BUSY = threading.local()


def _run(name: str, module: ModuleType) -> None:
    with _LOCK:
        callbacks = _CALLBACKS.pop(name, [])
    for done, callback in enumerate(callbacks):
        try:
            callback(module)
        except BaseException:
            # The import fails with the callback's error; keep the callbacks
            # not yet run for the next attempt. TensorFlow's own import
            # imports Keras and swallows its ImportError / AttributeError: a
            # callback failing there (the plugin's modules still being
            # imported) must not leave the script's later `import keras`
            # unpatched, every rank training alone.
            with _LOCK:
                _CALLBACKS.setdefault(name, [])[:0] = callbacks[done:]
                if _FINDER not in sys.meta_path:
                    sys.meta_path.insert(0, _FINDER)
            raise


class _Loader(importlib.abc.Loader):
    """Delegates to the real loader; runs the callbacks once the module's
    code has run."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        with _LOCK:
            around = _AROUND.pop(module.__name__, [])
        with contextlib.ExitStack() as stack:
            for make in around:
                stack.enter_context(make())
            self._inner.exec_module(module)
        _run(module.__name__, module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        wanted = fullname in _CALLBACKS or fullname in _AROUND
        if not wanted or fullname in getattr(_BUSY, "names", ()):
            return None
        busy = _BUSY.__dict__.setdefault("names", set())
        busy.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            busy.discard(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        spec.loader = _Loader(spec.loader)
        return spec


_FINDER = _Finder()


def when_imported(name: str, callback: Callable[[ModuleType], None]) -> None:
    """Calls `callback(module)` once module `name` has been imported: now,
    if it already is."""
    module = sys.modules.get(name)
    if module is not None:
        callback(module)
        return
    with _LOCK:
        _CALLBACKS.setdefault(name, []).append(callback)
        if _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)


def around_import(name: str, make_context: Callable[[], Any]) -> None:
    """Runs the import of module `name`, when it comes, inside the context
    `make_context()` (nothing if it is imported already)."""
    if name in sys.modules:
        return
    with _LOCK:
        _AROUND.setdefault(name, []).append(make_context)
        if _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)


def remove() -> None:
    """Forgets pending callbacks and takes the finder off `sys.meta_path`."""
    with _LOCK:
        _CALLBACKS.clear()
        _AROUND.clear()
        if _FINDER in sys.meta_path:
            sys.meta_path.remove(_FINDER)

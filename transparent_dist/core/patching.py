"""Installing and undoing monkey patches, once each, originals kept.

```python
from transparent_dist.core import patching
class Greeter:
    def hello(self):
        return "hello"
patching.wrap(Greeter, "hello", lambda original: lambda self: original(self) + "!")
assert Greeter().hello() == "hello!"
assert patching.original(Greeter, "hello")(Greeter()) == "hello"
patching.undo_all()
assert Greeter().hello() == "hello"
```

A patch is keyed by (owner, attribute): installing it again is a no-op, so
activating the plugin twice changes nothing. Each wrapper carries the
callable it replaced as `__td_original__`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["classes_defining", "is_patched", "original", "undo_all", "wrap", "wrap_everywhere"]

_MISSING = object()
# (id(owner), name) -> (owner, name, what owner.__dict__ held before, or _MISSING)
_INSTALLED: dict[tuple[int, str], tuple[Any, str, Any]] = {}


def wrap(owner: Any, name: str, make_wrapper: Callable[[Any], Any]) -> bool:
    """Replaces `owner.name` by `make_wrapper(original)`; False if that
    patch is installed already."""
    key = (id(owner), name)
    if key in _INSTALLED:
        return False
    own = vars(owner).get(name, _MISSING) if hasattr(owner, "__dict__") else _MISSING
    original = getattr(owner, name)
    wrapper = make_wrapper(original)
    try:
        wrapper.__td_original__ = original
        wrapper.__wrapped__ = original
        for attr in ("__name__", "__qualname__", "__doc__"):
            setattr(wrapper, attr, getattr(original, attr, None))
    except (AttributeError, TypeError):
        pass
    setattr(owner, name, wrapper)
    _INSTALLED[key] = (owner, name, own)
    return True


def wrap_everywhere(function: Any, make_wrapper: Callable[[Any], Any], prefix: str) -> None:
    """Wraps a module-level function in every loaded module under `prefix`
    that holds it (its own module and the public namespaces re-exporting it),
    since each holds its own reference."""
    import sys

    name = function.__name__
    for module_name, module in list(sys.modules.items()):
        if module_name.startswith(prefix) and getattr(module, name, None) is function:
            wrap(module, name, make_wrapper)


def classes_defining(bases: Iterable[type], name: str) -> list[type]:
    """`bases` and all their subclasses that define `name` themselves: the
    classes whose `name` a patch must wrap to cover every subclass."""
    found, stack = [], list(bases)
    while stack:
        cls = stack.pop()
        if name in vars(cls):
            found.append(cls)
        stack.extend(cls.__subclasses__())
    return found


def original(owner: Any, name: str) -> Any:
    """The callable that `owner.name` had before it was patched."""
    value = getattr(owner, name)
    return getattr(value, "__td_original__", value)


def is_patched(owner: Any, name: str) -> bool:
    return (id(owner), name) in _INSTALLED


def undo_all() -> None:
    """Restores every patched attribute, newest first."""
    for owner, name, own in reversed(list(_INSTALLED.values())):
        if own is _MISSING:
            try:
                delattr(owner, name)
            except AttributeError:
                pass
        else:
            setattr(owner, name, own)
    _INSTALLED.clear()

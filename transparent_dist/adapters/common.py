"""Pieces the adapters share (Keras 3, tf_keras, TF1, custom loops).

```python
from transparent_dist.adapters import common
with common.flag("fitting"):
    assert common.is_set("fitting")
```
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from transparent_dist.core import collectives, sequence, world
from transparent_dist.tf import broadcast

__all__ = [
    "agree_on_compile",
    "bind",
    "call",
    "classes_defining",
    "compile_settings",
    "distributed",
    "enter_phase",
    "flag",
    "gathered_rows",
    "is_set",
    "metric_variables",
    "no_op",
    "output_on_root_only",
]

_LOCAL = threading.local()


def no_op(*args: Any, **kwargs: Any) -> None:
    """Stands in for a callback method that must not act on this rank."""
    return None


def distributed() -> bool:
    return world.get().size > 1


def is_set(name: str) -> bool:
    """Whether this thread is inside `flag(name)` (e.g. "fitting", or
    "applying": an outer optimizer already averaged the gradients)."""
    return getattr(_LOCAL, name, False)


@contextlib.contextmanager
def flag(name: str) -> Iterator[None]:
    previous = is_set(name)
    setattr(_LOCAL, name, True)
    try:
        yield
    finally:
        setattr(_LOCAL, name, previous)


def bind(original: Any, self: Any, args: tuple, kwargs: dict) -> dict:
    """The arguments of a call to `original` (fit / evaluate / predict) by
    name, defaults filled in, so a wrapper can change some and pass on all."""
    bound = inspect.signature(inspect.unwrap(original)).bind(self, *args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    arguments.update(arguments.pop("kwargs", None) or {})
    return arguments


def call(original: Any, arguments: dict) -> Any:
    """Calls `original` with arguments from `bind`."""
    self = arguments.pop("self")
    return original(self, **arguments)


def output_on_root_only(arguments: dict, callbacks: Any) -> None:
    """Sets the callbacks this rank runs (`callbacks`, from the framework's
    own rule) and turns the progress bar off on every rank but 0."""
    arguments["callbacks"] = callbacks
    if not world.get().is_root:
        arguments["verbose"] = 0


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


def gathered_rows(outputs: Any) -> Any:
    """`predict`'s outputs (nested numpy arrays) with every rank's rows, in
    rank order, on every rank."""
    import tensorflow as tf

    comm = world.get().comm
    return tf.nest.map_structure(lambda o: collectives.allgather_rows(o, comm), outputs)


def metric_variables(metrics: Iterable[Any]) -> list[Any]:
    """Every variable of `metrics`, each once, in a fixed order."""
    return broadcast.unique(v for metric in metrics for v in metric.variables)


# The arguments of fit / evaluate / predict that decide how many collectives
# the call issues: every rank must pass the same.
_DECIDING = (
    "batch_size",
    "epochs",
    "initial_epoch",
    "steps_per_epoch",
    "steps",
    "validation_steps",
    "validation_batch_size",
    "validation_freq",
)


def enter_phase(kind: str, arguments: dict) -> None:
    """`sequence.enter` for a fit / evaluate / predict call, with the
    arguments that decide its collectives."""
    import numbers

    shown: dict[str, Any] = {}
    for name in _DECIDING:
        value = arguments.get(name)
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            value = int(value)
        if name in arguments:
            shown[name] = value
    if kind == "fit":
        shown["validation"] = arguments.get("validation_data") is not None or bool(
            arguments.get("validation_split")
        )
    sequence.enter(kind, shown)


def compile_settings(model: Any) -> dict:
    """What `model.compile` was given (optimizer class and hyperparameters,
    loss, metrics), as plain values every rank can compare."""
    import json

    try:
        config = model.get_compile_config() or {}
    except Exception:  # noqa: BLE001 - a model compiled in a way we cannot read
        return {}
    # Through JSON: numpy scalars and other leaves become comparable values.
    # Object names are left out: Keras numbers them per process ("adam_1").
    return json.loads(
        json.dumps(config, sort_keys=True, default=repr),
        object_hook=lambda d: {k: v for k, v in d.items() if k != "name"},
    )


def agree_on_compile(model: Any) -> None:
    """Every rank compiled alike: one optimizer class and hyperparameters,
    one loss, one set of metrics (the variable shapes alone cannot tell
    Adam from AdamW, or one loss from another)."""
    collectives.check_agreement(
        "the compiled settings (optimizer, loss, metrics)",
        compile_settings(model),
        world.get().comm,
    )

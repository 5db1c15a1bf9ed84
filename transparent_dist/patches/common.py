"""Pieces the framework patches share (Keras 3, tf_keras, TF1).

```python
from transparent_dist.patches import common
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

from transparent_dist import broadcast, gradients, world

_LOCAL = threading.local()


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


def metric_variables(metrics: Iterable[Any]) -> list[Any]:
    """Every variable of `metrics`, each once, in a fixed order."""
    return broadcast.unique(v for metric in metrics for v in metric.variables)


def zero_if_no_samples(loss: Any) -> Any:
    """The loss of a step, or 0 when this rank's batch is empty: a mean over
    no samples is NaN, and such a rank must count as nothing."""
    count = gradients.current_sample_count() if distributed() else None
    if count is None:
        return loss
    import tensorflow as tf

    return tf.where(count > 0, loss, tf.zeros_like(loss))


def wrap_compute_loss(original: Any) -> Any:
    """A patch for a trainer's loss method: `zero_if_no_samples` of it."""

    def compute_loss(self, *args, **kwargs):
        return zero_if_no_samples(original(self, *args, **kwargs))

    return compute_loss

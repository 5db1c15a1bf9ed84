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

from transparent_dist import broadcast, collectives, gradients, sequence, world

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


def stop_agreement(base: type) -> type:
    """A callback class (of the framework's `base`) that runs last in fit:
    after each step and epoch the ranks agree whether to stop (and, with a
    `checkpointer`, whether to write a checkpoint)."""

    class AgreeToStop(base):
        def __init__(self, checkpointer: Any = None) -> None:
            super().__init__()
            self.checkpointer = checkpointer

        def _agree(self, where: str) -> int:
            wanted = self.checkpointer.wanted() if self.checkpointer is not None else 0
            flags = sequence.agree_to_stop(bool(self.model.stop_training), wanted, where)
            if flags & sequence.STOP:
                self.model.stop_training = True
            return flags

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            flags = self._agree(f"step {batch + 1}")
            if self.checkpointer is not None:
                self.checkpointer.after_agreement(flags)

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            self._agree(f"the end of epoch {epoch + 1}")

    return AgreeToStop

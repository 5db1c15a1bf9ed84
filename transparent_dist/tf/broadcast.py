"""Rank 0's variable values on every rank: the same start everywhere.

```python
import keras
from transparent_dist.tf import broadcast
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
broadcast.variables(model.variables)   # every rank now holds rank 0's weights
```

Used by the framework patches before the first update (weights and
optimizer state), and for non-trainable state (batch-norm statistics) at
the end of each epoch, the way PyTorch's DDP broadcasts its buffers.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import numpy as np

from transparent_dist.core import collectives, unique, world
from transparent_dist.tf import host_op

__all__ = [
    "before_first_update",
    "in_graph",
    "is_synced",
    "mark_synced",
    "metric_variables",
    "model_and_optimizer",
    "optimizer_variables",
    "variables",
]

# Optimizers whose variables have been made equal across ranks; their first
# update need not broadcast again.
_SYNCED_OPTIMIZERS: weakref.WeakSet = weakref.WeakSet()
# Optimizer -> the variable its traced first update sets once it has synced
# (`before_first_update`, for variables created inside the trace).
_FIRST_UPDATE_DONE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def variables(targets: Iterable[Any], root: int = 0, what: str = "model variables") -> None:
    """Assigns rank `root`'s values to `variables` on every rank (eagerly;
    call under `tf.init_scope()` from traced code) of `targets`. The ranks first check
    that they hold the same list of shapes and dtypes, and raise the same
    error everywhere if not."""
    w = world.get()
    if w.size == 1:
        return
    targets = unique.by_identity(targets)
    values = [np.asarray(v.numpy()) for v in targets]
    layout = [(tuple(int(d) for d in a.shape), a.dtype.str) for a in values]
    collectives.check_agreement(
        f"the {what} ({len(layout)} variables: shapes and dtypes)", layout, w.comm
    )
    for v, value in zip(targets, collectives.broadcast(values, w.comm, root), strict=True):
        v.assign(value)


def optimizer_variables(optimizer: Any) -> list[Any]:
    """An optimizer's variables (a property in Keras 3 and tf_keras's new
    optimizers, a method in tf_keras's legacy ones)."""
    found = optimizer.variables
    return list(found() if callable(found) else found)


def metric_variables(metrics: Iterable[Any]) -> list[Any]:
    """Every variable of `metrics`, each once, in a fixed order."""
    return unique.by_identity(v for metric in metrics for v in metric.variables)


def model_and_optimizer(model: Any, build_optimizer: Any = None) -> None:
    """Broadcasts rank 0's model variables and, once built, its optimizer's.
    `build_optimizer(optimizer, variables)` builds an unbuilt optimizer
    first, so that its state is broadcast (or restored) like the weights."""
    targets = list(model.variables)
    optimizer = getattr(model, "optimizer", None)
    # A model built lazily (no Input, subclassed) has no variables yet: its
    # optimizer is built, and synced, at its first update instead
    # (`before_first_update`).
    if optimizer is not None and build_optimizer is not None and getattr(model, "built", True):
        build_optimizer(optimizer, model.trainable_variables)
    built = optimizer is not None and getattr(optimizer, "built", True)
    if built:
        targets += optimizer_variables(optimizer)
    variables(targets, what="model and optimizer variables")
    if built:
        mark_synced(optimizer)


def before_first_update(optimizer: Any, trainable: list[Any]) -> None:
    """Rank 0's `trainable` variables and optimizer state on every rank before the
    optimizer's first update: at once when they all hold values (eager
    code), else inside the traced step, run once, the first time the step
    runs. Models built lazily (no `Input`, subclassed) create their
    variables inside the first trace of the step, where no value can be
    read yet."""
    if world.get().size == 1 or is_synced(optimizer):
        return
    import tensorflow as tf

    targets = unique.by_identity(list(trainable) + optimizer_variables(optimizer))
    # Variables that already hold values (a model built before the step was
    # traced) are set now, before the first step runs at all: its forward
    # pass then already sees rank 0's weights.
    with tf.init_scope():
        try:
            values = [np.asarray(v.numpy()) for v in targets]
        except Exception:  # noqa: BLE001 - created inside this trace: no value yet
            values = None
        # Created inside this trace, a variable may also read as empty.
        if values is not None and all(
            a.shape == tuple(v.shape) for a, v in zip(values, targets, strict=True)
        ):
            variables(targets, what="trainable variables and optimizer state")
            mark_synced(optimizer)
            return
    done = _FIRST_UPDATE_DONE.get(optimizer)
    if done is None:
        with tf.init_scope():
            done = tf.Variable(False, trainable=False, name="td_first_update_synced")
        # Kept here, not on the optimizer: this flag is not optimizer state.
        _FIRST_UPDATE_DONE[optimizer] = done

    def sync():
        with tf.control_dependencies([in_graph(targets)]):
            return tf.constant(True)

    tf.cond(done, lambda: tf.constant(True), sync)
    done.assign(True)


def in_graph(targets: list[Any], after: Any = None) -> Any:
    """A graph op that sets `targets` (variables) to rank 0's values, after
    `after` if given; the ranks first check that they hold the same shapes
    and dtypes (the same error everywhere if not)."""
    import tensorflow as tf

    comm = world.get().comm

    def receive(*arrays):
        collectives.check_agreement(
            f"the variables to broadcast ({len(arrays)} variables: shapes and dtypes)",
            [(tuple(a.shape), a.dtype.str) for a in arrays],
            comm,
        )
        return collectives.broadcast(arrays, comm)

    with tf.control_dependencies([after] if after is not None else []):
        # A new read under the dependency: a TF1 ref variable's identity
        # reads its snapshot op, made before, which may run before `after`.
        values = [v.read_value() if hasattr(v, "read_value") else tf.identity(v) for v in targets]
    received = host_op.collective_op(receive, values, values, "td_broadcast_variables")
    return tf.group(*[v.assign(r) for v, r in zip(targets, received, strict=True)])


def mark_synced(optimizer: Any) -> None:
    _SYNCED_OPTIMIZERS.add(optimizer)


def is_synced(optimizer: Any) -> bool:
    return optimizer in _SYNCED_OPTIMIZERS

"""Rank 0's variable values on every rank: the same start everywhere.

```python
import keras
from transparent_dist import broadcast
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

from transparent_dist import collectives, world

# Optimizers whose variables have been made equal across ranks; their first
# update need not broadcast again.
_SYNCED_OPTIMIZERS: weakref.WeakSet = weakref.WeakSet()


def _unique(variables: Iterable[Any]) -> list[Any]:
    seen: set[int] = set()
    out = []
    for v in variables:
        if id(v) not in seen:
            seen.add(id(v))
            out.append(v)
    return out


def variables(targets: Iterable[Any], root: int = 0, what: str = "model variables") -> None:
    """Assigns rank `root`'s values to `variables` on every rank (eagerly;
    call under `tf.init_scope()` from traced code) of `targets`. The ranks first check
    that they hold the same list of shapes and dtypes, and raise the same
    error everywhere if not."""
    w = world.get()
    if w.size == 1:
        return
    targets = _unique(targets)
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


def model_and_optimizer(model: Any, build_optimizer: Any = None) -> None:
    """Broadcasts rank 0's model variables and, once built, its optimizer's.
    `build_optimizer(optimizer, variables)` builds an unbuilt optimizer
    first, so that its state is broadcast (or restored) like the weights."""
    targets = list(model.variables)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and build_optimizer is not None:
        build_optimizer(optimizer, model.trainable_variables)
    built = optimizer is not None and getattr(optimizer, "built", True)
    if built:
        targets += optimizer_variables(optimizer)
    variables(targets, what="model and optimizer variables")
    if built:
        mark_synced(optimizer)


def mark_synced(optimizer: Any) -> None:
    _SYNCED_OPTIMIZERS.add(optimizer)


def is_synced(optimizer: Any) -> bool:
    return optimizer in _SYNCED_OPTIMIZERS

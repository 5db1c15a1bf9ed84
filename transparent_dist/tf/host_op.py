"""A host (numpy) function as one ordered op of a TensorFlow step: how
collectives are called from inside a `tf.function` where the native op
does not serve (the numpy fallback of the exchange, variable broadcasts).

```python
import tensorflow as tf
from transparent_dist.tf import host_op
doubled = host_op.collective_op(lambda a: a * 2, [tf.ones(3)], [tf.ones(3)], "double")
```
"""

from __future__ import annotations

from typing import Any

__all__ = ["collective_op"]


def collective_op(fn: Any, inputs: list, like: list, name: str) -> list[Any]:
    """`fn` (a numpy-level collective) as one stateful TF op whose outputs
    have the dtypes and static shapes of `like`. Stateful ops keep program
    order inside a `tf.function`, which keeps the collectives in the same
    order on every rank."""
    import tensorflow as tf

    outputs = tf.numpy_function(fn, inputs, [t.dtype for t in like], stateful=True, name=name)
    for tensor, reference in zip(outputs, like, strict=True):
        tensor.set_shape(reference.shape)
    return list(outputs)

"""TensorFlow as the plugin's `Backend`: today's exchange, broadcast and
inputs, described once for the adapters above them.

```python
from transparent_dist.tf.backend import TENSORFLOW
TENSORFLOW.name   # 'tensorflow'
```
"""

from __future__ import annotations

import contextlib
from typing import Any

from transparent_dist.core.backend import Backend
from transparent_dist.tf import broadcast, exchange, host_op
from transparent_dist.tf.inputs import resume

__all__ = ["TENSORFLOW"]


def _sample_count(first: Any) -> Any:
    """The leading dimension of a batch's first input, as a tensor (known
    only when the step runs, in a traced step)."""
    import tensorflow as tf

    return tf.shape(first)[0]


def _zero_if_empty(loss: Any) -> Any:
    count = exchange.current_sample_count()
    if count is None:
        return loss
    import tensorflow as tf

    return tf.where(count > 0, loss, tf.zeros_like(loss))


def _outside_trace() -> Any:
    import tensorflow as tf

    return tf.init_scope()


def _compiled(fn: Any) -> Any:
    import tensorflow as tf

    # autograph off, as Keras traces its steps.
    return tf.function(fn, jit_compile=True, autograph=False)()


def _after(tensors: Any) -> Any:
    import tensorflow as tf

    # A sparse gradient waits through its values.
    waited = [getattr(t, "values", t) for t in tensors if t is not None]
    if not waited or tf.executing_eagerly():
        return contextlib.nullcontext()
    # One barrier op: each op made in the context gets one control input,
    # not one per exchange op (a bucket, a dtype, a sparse gradient).
    return tf.control_dependencies([tf.group(*waited, name="td_exchange_done")])


TENSORFLOW = Backend(
    name="tensorflow",
    average=exchange.average,
    sum=exchange.sum_over_ranks,
    divide_loss=exchange.divide_loss,
    before_first_update=broadcast.before_first_update,
    sample_count=_sample_count,
    zero_if_empty=_zero_if_empty,
    skip_batches=resume.skip_first,
    num_batches=resume.num_batches,
    host_op=host_op.collective_op,
    outside_trace=_outside_trace,
    prepare=exchange.prepare,
    compiled=_compiled,
    after=_after,
)

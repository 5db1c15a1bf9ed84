"""What the plugin needs of a tensor library: a `Backend`, one per library,
chosen when the script imports Keras (`runtime.activation`), in the manner
of Keras's own `distribution_lib` over `backend/<name>/distribution_lib`.

```python
from transparent_dist.tf.backend import TENSORFLOW   # the one backend today
averaged = TENSORFLOW.average(grads)                  # inside a train step
```

The adapters above a backend (`adapters.keras`, the backend-neutral
`adapters.keras3`) reach gradients, metric states, variables and batches
only through these functions; what they do (the arithmetic, the order of
the collectives, which rank's values win) is the same for every backend
and documented where the TensorFlow one implements it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

__all__ = ["Backend"]


@dataclasses.dataclass(frozen=True, eq=False)
class Backend:
    """A tensor library, as the plugin uses it.

    Attributes:
        name: Keras's name for it (`keras.backend.backend()`).
        average: `grads -> grads` averaged over the ranks, weighted by the
            step's sample counts (`core.step_state`); None stays None. Called
            inside the train step, at the same point on every rank.
        sum: `tensors -> tensors` summed element-wise over the ranks
            (metric states, which are additive).
        divide_loss: `loss -> loss` divided by N when the backend's average
            takes pre-divided gradients (else `loss` itself).
        before_first_update: `(optimizer, variables)`: rank 0's variables
            and optimizer state on every rank before the optimizer's first
            update (at once, or inside the step's first run).
        sample_count: `first input -> count`: the samples of a batch, from
            its first input (as the framework's tree orders them); a tensor
            in a traced step.
        zero_if_empty: `loss -> loss`, or 0 when this rank's batch in the
            current step is empty (a mean over no samples is NaN).
        skip_batches: `(data, steps, epoch_steps=None) -> (data less its
            first `steps()` batches in its next epoch, the counter to set to
            0 after it)`, or None when `data` is not the backend's dataset
            (then `steps` is not called). For an exact resume. `epoch_steps`:
            the resumed and full epochs' steps where `data` never ends.
        num_batches: `data -> batches in one pass of it` (-1: endless),
            or None when `data` is not the backend's dataset or its length
            is unknown. For a resume after a lost rank.
        host_op: `(fn, inputs, like, name) -> outputs`: the numpy-level
            `fn` as one op of the step, kept in program order (collectives
            issued from it run in the same order on every rank), its
            outputs shaped and typed like `like`.
        outside_trace: a context that lifts code out of the step being
            traced (to build an optimizer's state with real values).
        prepare: makes the exchange ready, on every rank at once, outside
            any trace (when a fit begins): whatever is collective or slow
            about its first use.
        compiled: `fn -> fn()` run as one function compiled by the
            library's compiler (XLA), inside a traced step; what `fn`
            reads of the step is captured. For the parts of a step with no
            exchange in them, when the script asked for compilation.
        after: `tensors -> context` in which the ops made run only once
            `tensors` exist: an optimizer's update made in it, its step
            counter included, is not applied when its exchange failed (a
            lost rank: `core.elastic`), so the counter says which ranks
            hold which step.
    """

    name: str
    average: Callable[[Sequence[Any]], list[Any]]
    sum: Callable[[Sequence[Any]], list[Any]]
    divide_loss: Callable[[Any], Any]
    before_first_update: Callable[[Any, list[Any]], None]
    sample_count: Callable[[Any], Any]
    zero_if_empty: Callable[[Any], Any]
    skip_batches: Callable[..., tuple[Any, Any] | None]
    host_op: Callable[[Callable[..., Any], list[Any], list[Any], str], list[Any]]
    outside_trace: Callable[[], AbstractContextManager[Any]]
    prepare: Callable[[], None]
    compiled: Callable[[Callable[[], Any]], Any]
    after: Callable[[Sequence[Any]], AbstractContextManager[Any]] = lambda tensors: (
        contextlib.nullcontext()
    )
    num_batches: Callable[[Any], int | None] = lambda data: None

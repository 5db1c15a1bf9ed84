"""The facts that decide what a call and a step do under N ranks, in one
typed value.

```python
from transparent_dist.core import step_state
with step_state.within(fitting=True):
    assert step_state.current().fitting
assert not step_state.current().fitting
step_state.current().fiting      # AttributeError: a misspelt fact fails loudly
```

The adapters open facts with `within` around a call (`fit` sets
`fitting`), a step (`exchange.step` sets `samples`) or an update
(`applying`); whoever must decide reads `current()`. A fact learnt in the
middle of a step (the loss was divided, the target was a vector) is
`declare`d: it lasts until the innermost `within` that set it ends.

The value lives in a `contextvars.ContextVar`. For threads that is what a
`threading.local` was: a new thread (tf.data's, a Keras data worker's)
starts from the defaults, and `tf.function` traces on the calling thread,
so a step traced inside `fit` sees `fitting`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from typing import Any

__all__ = ["StepState", "current", "declare", "reset", "within"]


@dataclasses.dataclass(frozen=True)
class StepState:
    """Where this thread is, and what the step so far has told.

    The call:
        fitting: inside a patched `fit` (its steps, its callbacks).
        own_train_step: that fit runs Keras's own train step (whose loss
            may be divided by N, `exchange.divide_loss`).
        whole_validation: fit's validation data is taken whole by every
            rank (fewer samples than ranks): only rank 0's states count.
        keras_call: inside a patched `evaluate` / `predict`.
        step_function: the `tf.function` a custom loop is calling at the
            top (an update inside it makes it a training step), or None.
    The update:
        applying: an outer optimizer averaged the gradients already (a
            wrapping optimizer calls its inner one's update).
        scaling: inside the patched `scale_loss` (subclasses chain it).
        deferred: inside the XLA-compiled part of a split train step: a
            list that an optimizer's update appends (optimizer, gradients,
            variables) to instead of running (the step runs it after the
            compiled part, exchange first), or None: update now.
        compiled_update: the update after the exchange is compiled
            (`Backend.compiled`): the deferred update of a split step.
    The step:
        in_step: inside a Keras 3 train / test step.
        in_session_step: inside a TF1 `Session.run` of a train op.
        samples: this rank's sample count in the step (a tensor while the
            step is traced), or None outside a framework step (custom
            loops: a plain mean).
        divided: the loss was divided by N already, so the gradients
            arrive as shares of the mean.
        summed: the target was a vector TensorFlow summed (per-sample
            losses): one process's gradient is a sum over the batch.
    """

    fitting: bool = False
    own_train_step: bool = False
    whole_validation: bool = False
    keras_call: bool = False
    step_function: Any = None
    applying: bool = False
    scaling: bool = False
    deferred: list | None = None
    compiled_update: bool = False
    in_step: bool = False
    in_session_step: bool = False
    samples: Any = None
    divided: bool = False
    summed: bool = False


# The default is frozen, so sharing it between threads is safe.
_STATE: contextvars.ContextVar[StepState] = contextvars.ContextVar(
    "transparent_dist_step_state",
    default=StepState(),  # noqa: B039 - frozen: never changed in place
)


def current() -> StepState:
    """The state of this thread's call and step."""
    return _STATE.get()


def declare(**facts: Any) -> StepState:
    """Sets `facts` (field names of `StepState`; another name is a
    TypeError) from now until the innermost `within` around this call ends;
    returns the new state."""
    state = dataclasses.replace(_STATE.get(), **facts)
    _STATE.set(state)
    return state


@contextlib.contextmanager
def within(**facts: Any) -> Iterator[StepState]:
    """`facts` set while the block runs; after it, those fields are back to
    what they were (the others keep what was declared inside)."""
    previous = _STATE.get()
    state = declare(**facts)
    try:
        yield state
    finally:
        _STATE.set(dataclasses.replace(_STATE.get(), **{k: getattr(previous, k) for k in facts}))


def reset() -> None:
    """This thread back to no call and no step."""
    _STATE.set(StepState())

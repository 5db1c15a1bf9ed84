"""`fit` going on with the survivors when a rank is lost (MPI ULFM).

```python
from transparent_dist.adapters import keras_elastic
history = keras_elastic.fit(fw, model, arguments, run)   # run(arguments, resume, position)
```

`run` is the adapter's fit (sharding, callbacks, Keras's own `fit`). When
it raises because a rank was lost (`core.elastic.recover` turns that into
a world of the survivors, or raises it again), the survivors go back to the
last step every one of them completed and run `fit` again from there, over
the new world:

- The step: the optimizer's step counter (`iterations`) says how many
  updates a rank's variables hold, whatever the step was doing when the
  error came (an update is applied after its exchange, and the counter is
  advanced with it), so the least over the survivors is the last step all
  completed, and a rank holding it has that step's state. That rank (the
  lowest such) broadcasts its model and optimizer variables: no copy is
  kept while nothing fails.
- The data: the epoch and its step at that count (`FitPosition`, noted at
  each epoch's start), so the rest of the epoch is the same global batches,
  re-split over the survivors (`Backend.skip_batches`, the exact epoch
  lengths of a resume).
- The history: the epochs done before, put back in front of the new run's.
- The steps: traced again, for the new world's size.

The world's `batch_ranks` keeps the global batch of the per-rank batch
setting: each survivor takes a larger share of the same global batch.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from transparent_dist.adapters import keras_callback_state
from transparent_dist.core import collectives, elastic, log, shard_plan, unique, world
from transparent_dist.tf import broadcast

__all__ = ["Resume", "fit"]


@dataclasses.dataclass(frozen=True)
class Resume:
    """Where a fit goes on after a loss: `epoch` (0-based), the steps of it
    done (`step`), the optimizer's step count (`iterations`), the epochs'
    history before, and the epoch's steps (None if unknown)."""

    epoch: int
    step: int
    iterations: int
    history: dict | None
    steps: int | None = None


class _FitPosition:
    """Notes each epoch's start (its number, the optimizer's step count, the
    steps already done in it) for a recovery; a resumed epoch's skip counter
    is set to 0 at its end, and the earlier epochs' history put back."""

    def __init__(self, resume: Resume | None = None, skip: Any = None) -> None:
        super().__init__()
        self.epoch, self.start, self.offset = 0, 0, 0
        self.resume, self.skip = resume, skip
        # A resumed run's `params["steps"]` is its first (short) epoch's.
        self.full_steps = None if resume is None else resume.steps

    def _restore_history(self) -> None:
        resume, self.resume = self.resume, None
        if resume is not None:
            keras_callback_state.restore_history(self.model, resume.history)

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._restore_history()
        self.offset = int(self.skip.numpy()) if self.skip is not None else 0
        self.epoch, self.start = epoch, int(self.model.optimizer.iterations.numpy())

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if self.skip is not None:
            self.skip.assign(0)

    def on_train_end(self, logs: Any = None) -> None:
        self._restore_history()

    def steps(self) -> int | None:
        """A whole epoch's steps (None if unknown)."""
        return self.full_steps or (getattr(self, "params", None) or {}).get("steps")


@functools.cache
def _position_class(base: type) -> type:
    return type("FitPosition", (_FitPosition, base), {})


def position(fw: Any, resume: Resume | None = None, skip: Any = None) -> Any:
    """The `FitPosition` callback over `fw`'s `Callback`."""
    return _position_class(fw.callback_base)(resume, skip)


def _state_variables(fw: Any, model: Any) -> list[Any]:
    optimizer = model.optimizer
    rate = fw.learning_rate(optimizer)
    return unique.by_identity(
        [
            *model.variables,
            *broadcast.optimizer_variables(optimizer),
            *([] if rate is None else [rate]),
        ]
    )


def _roll_back(fw: Any, model: Any, noted: Any, history: dict | None) -> Resume:
    """Every survivor back at the last step all of them completed, from the
    lowest survivor that holds it (collective over the survivors)."""
    w = world.get()
    done = int(model.optimizer.iterations.numpy())
    steps = noted.steps() or -1
    record = np.array([done, noted.epoch, noted.start, noted.offset, steps], np.int64)
    table = collectives.allgather_records(record, w.comm, "agreement check")
    log.debug(f"after the loss: [iterations, epoch, its start, its offset, steps] {table.tolist()}")
    least = int(table[:, 0].min())
    source = int(np.flatnonzero(table[:, 0] == least)[0])
    _, epoch, start, offset, steps = (int(v) for v in table[source])
    broadcast.variables(_state_variables(fw, model), root=source, what="model and optimizer state")
    step = offset + least - start
    if steps > 0 and step >= steps:
        epoch, step = epoch + 1, 0
    return Resume(epoch, step, least, history, steps if steps > 0 else None)


def _say(loss: elastic.Loss, resume: Resume, global_batch: int) -> None:
    share = global_batch // loss.size
    log.info(
        f"lost {loss.where()} in epoch {resume.epoch + 1}; {loss.size} of {loss.size_before} "
        f"ranks go on from step {resume.step} of that epoch (the last step every rank "
        f"completed), with the same global batch of {global_batch} ({share} per rank"
        f"{'' if global_batch % loss.size == 0 else ', one more on some'}); "
        f"recovered in {loss.seconds:.2f} s",
        once=False,
    )


def fit(
    fw: Any,
    model: Any,
    arguments: dict,
    run: Callable[[dict, Resume | None, Any], Any],
) -> Any:
    """`run(arguments, resume, position)` until it returns, going on after
    each lost rank (see the module's docstring). `arguments` are fit's
    (`calls.bind`), before sharding."""
    resume: Resume | None = None
    global_batch = shard_plan.global_batch(arguments.get("batch_size"))
    while True:
        noted = position(fw, resume)
        try:
            return run(dict(arguments), resume, noted)
        except Exception as error:  # noqa: BLE001 - recover() re-raises what is not a loss
            loss = elastic.recover(error)
            history = keras_callback_state.snapshot_history(model)
            resume = _roll_back(fw, model, noted, history)
            # The steps were traced for the old world (its size is a
            # constant in them: the divided loss, the summed target).
            model.train_function = model.test_function = model.predict_function = None
            _say(loss, resume, global_batch)

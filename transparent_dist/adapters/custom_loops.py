"""TF2 pieces that custom training loops and custom train steps meet,
installed by `install()` when TensorFlow is imported.

```python
import tensorflow as tf
from transparent_dist.adapters import custom_loops
custom_loops.install()      # idempotent; transparent_dist's import hook calls it
```

- `tf.GradientTape.gradient` of a target that is not a scalar (a vector of
  per-sample losses, which TensorFlow sums): one process's gradient is then
  a sum over the global batch, so the exchange sums the ranks' gradients
  instead of averaging them (`exchange.target_was_summed`).
- `tf.train.Checkpoint` (so `CheckpointManager` too): files are written by
  rank 0 only; the other ranks get the same return value, and their save
  counters advance alike.
- A `tf.data.Dataset` iterated by the script itself (a custom loop) is not
  split between the ranks: the first update of such a loop says so, once,
  with the one-line fix (not when the script split it: a `shard` in it).
- Preemption (`TD_CHECKPOINT_DIR`, `core.preemption`): every optimizer
  update outside `fit` is a step. At the first one, the loop resumes from
  the latest checkpoint (trainable variables and optimizer state) and the
  updates the checkpoint holds already are skipped (the script's loop runs
  from its start again: with a seeded or unshuffled input the batches line
  up, and the run ends where the uninterrupted one does). After each eager
  update, or each call of a `tf.function` that updated, the ranks agree,
  and a signal or a due `TD_CHECKPOINT_EVERY` writes a checkpoint (and
  exits with 75 on a signal). State outside the optimizer's variables
  (BatchNorm statistics, the script's own counters) is not saved.
- The end-of-script summary (`core.loop_summary`, more than one rank): a
  call of a `tf.function` that updated the optimizer is a step (its batch
  size is the leading dimension its arguments share), and so is an update
  made eagerly outside any `tf.function`; each call is a `step` span in
  the timeline.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any

import tensorflow as tf

from transparent_dist.core import (
    log,
    loop_summary,
    patching,
    preemption,
    step_state,
    unique,
    world,
)
from transparent_dist.tf import broadcast, exchange, internals
from transparent_dist.tf.inputs import pipelines

__all__ = ["applied", "install", "reset", "warn_if_loop_data_is_whole"]

_SEEN = {"dataset_iterated": False, "warned": False}


def _is_vector(target: Any) -> bool:
    for leaf in tf.nest.flatten(target):
        shape = getattr(leaf, "shape", None)
        if shape is not None and shape.rank and shape.num_elements() != 1:
            return True
    return False


def _wrap_gradient(original: Any) -> Any:
    def gradient(self, target, sources, *args, **kwargs):
        if world.get().distributed and _is_vector(target):
            exchange.target_was_summed()
        return original(self, target, sources, *args, **kwargs)

    return gradient


def _wrap_checkpoint_write(original: Any) -> Any:
    def _write(self, file_prefix, *args, **kwargs):
        if world.get().is_root:
            return original(self, file_prefix, *args, **kwargs)
        # The path rank 0 writes, as the callers expect back.
        return file_prefix if isinstance(file_prefix, str) else str(file_prefix)

    return _write


def _wrap_dataset_iter(original: Any) -> Any:
    def __iter__(self):
        pipelines.iterator_made(self)
        state = step_state.current()
        if (
            world.get().distributed
            and threading.current_thread() is threading.main_thread()
            and not state.fitting
            and not state.keras_call
            and not _is_sharded(self)
        ):
            _SEEN["dataset_iterated"] = True
        return original(self)

    return __iter__


def _is_sharded(dataset: Any) -> bool:
    """Whether `dataset` is, or is built on, a `Dataset.shard` (the script
    split it between the ranks itself)."""
    stack, seen = [dataset], 0
    while stack and seen < 200:
        item = stack.pop()
        seen += 1
        if type(item).__name__ == "_ShardDataset":
            return True
        try:
            stack.extend(item._inputs())
        except Exception:  # noqa: BLE001 - a dataset kind without inputs
            pass
    return False


def warn_if_loop_data_is_whole() -> None:
    """Called at a custom loop's first update: says once, on rank 0, that a
    dataset the script iterates itself is used whole on every rank."""
    if _SEEN["warned"] or not _SEEN["dataset_iterated"]:
        return
    _SEEN["warned"] = True
    log.info(
        "WARNING: a custom training loop iterates a tf.data.Dataset: every rank uses all of it, "
        "so N ranks repeat the same work. Split it with one line before the loop: "
        "dataset = dataset.shard(transparent_dist.size(), transparent_dist.rank())"
    )


# ------------------------------------------------------------ preemption


class _Loop:
    """A custom loop's preemption state: the service, the updates this
    process has made (`count`, a variable so that traced steps count too),
    and how many of them a resumed checkpoint already holds."""

    def __init__(self, service: preemption.Service) -> None:
        self.service = service
        self.resume_at = 0
        self.targets: list[Any] = []
        self.seen = 0
        with tf.init_scope():
            self.count = tf.Variable(0, dtype=tf.int64, trainable=False, name="td_loop_updates")
        self._signals = preemption.handling_signals()
        self._signals.__enter__()  # for the rest of the process

    def resume(self, optimizer: Any, variables: list[Any]) -> None:
        self.targets = unique.by_identity(
            list(variables) + broadcast.optimizer_variables(optimizer)
        )
        with tf.init_scope():
            self.resume_at = self.service.resume_replaying(
                self.targets, lambda v, value: v.assign(value), "updates of the loop"
            )

    def state(self) -> tuple[list[Any] | None, dict]:
        arrays = preemption.values(self.targets) if world.get().is_root else None
        return arrays, {"epoch": 0, "step": self.service.global_step, "unit": None}

    def after_updates(self) -> None:
        """The step boundary, in Python: every update made since the last
        one is a step (a traced step holds one or more)."""
        done = int(self.count.numpy())
        while self.seen < done:
            self.seen += 1
            if self.seen > self.resume_at:  # not one the checkpoint holds
                self.service.step(self.state, where=f"update {self.seen}")


_LOOP: dict[str, Any] = {}


def _loop(optimizer: Any, variables: list[Any]) -> _Loop | None:
    if "loop" not in _LOOP:
        service = preemption.Service.from_settings()
        _LOOP["loop"] = None if service is None else _Loop(service)
        if _LOOP["loop"] is not None:
            _LOOP["loop"].resume(optimizer, variables)
    return _LOOP["loop"]


def reset() -> None:
    """Forgets the loop's preemption (its signal handlers give way to the
    ones before them), its step functions and the data checks
    (`activation.reset`)."""
    loop = _LOOP.pop("loop", None)
    if loop is not None:
        loop._signals.__exit__(None, None, None)
    _TRAINS.clear()
    _SEEN.update(dataset_iterated=False, warned=False)


# The summary's name for these loops.
_KIND = "custom training loop"
# The step functions (called at the top, eagerly: `StepState.step_function`)
# inside which an update was traced or run: training steps.
_TRAINS: weakref.WeakSet = weakref.WeakSet()


def _is_eager_step() -> bool:
    """At an update: whether it ends a step by itself (eager, outside any
    step function); inside one, marks that function as a training step."""
    function = step_state.current().step_function
    if function is not None:
        _TRAINS.add(function)
        return False
    return tf.executing_eagerly()


def applied(optimizer: Any, variables: list[Any], apply: Any) -> Any:
    """A custom loop's update `apply()`, counted for preemption (skipped
    while the resumed checkpoint holds it already) and for the summary."""
    eager_step = _is_eager_step()
    result = _applied(optimizer, variables, apply)
    if eager_step:
        loop_summary.step_ended(_KIND)
    return result


def _applied(optimizer: Any, variables: list[Any], apply: Any) -> Any:
    loop = _loop(optimizer, variables)
    if loop is None:
        return apply()
    if tf.executing_eagerly():
        if int(loop.count.numpy()) < loop.resume_at:
            loop.count.assign_add(1)
            return None
        result = apply()
        loop.count.assign_add(1)
        loop.after_updates()
        return result
    if loop.resume_at:

        def update() -> Any:
            apply()
            return tf.constant(True)

        done = tf.cond(loop.count < loop.resume_at, lambda: tf.constant(False), update)
    else:
        apply()
        done = tf.constant(True)
    with tf.control_dependencies([done]):
        return loop.count.assign_add(1)


def _call_as_step(original: Any, function: Any, args: tuple, kwargs: dict) -> Any:
    """A top-level call of a step function: a step of the summary when the
    function updates the optimizer."""
    started = time.perf_counter()
    with step_state.within(step_function=function):
        result = original(function, *args, **kwargs)
    if function in _TRAINS:
        batch = loop_summary.batch_size(tf.nest.flatten((args, kwargs)))
        loop_summary.step_ended(_KIND, batch=batch, started=started)
    return result


def _wrap_function_call(original: Any) -> Any:
    def __call__(self, *args, **kwargs):
        state = step_state.current()
        if (
            world.get().distributed
            and tf.executing_eagerly()
            and not state.fitting
            and state.step_function is None
        ):
            result = _call_as_step(original, self, args, kwargs)
        else:
            result = original(self, *args, **kwargs)
        loop = _LOOP.get("loop")
        if loop is not None and tf.executing_eagerly() and not step_state.current().fitting:
            loop.after_updates()
        return result

    return __call__


def install() -> None:
    """Installs the TF2 patches (idempotent)."""
    patching.wrap(internals.polymorphic_function.Function, "__call__", _wrap_function_call)
    patching.wrap(tf.GradientTape, "gradient", _wrap_gradient)
    for cls in (internals.checkpoint.Checkpoint, internals.checkpoint.CheckpointV1):
        patching.wrap(cls, "_write", _wrap_checkpoint_write)
    patching.wrap(internals.dataset_ops.DatasetV2, "__iter__", _wrap_dataset_iter)

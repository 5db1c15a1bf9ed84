"""TF1-style graphs (`tf.compat.v1`) made data-parallel, installed by
`install()` when TensorFlow is imported.

```python
import tensorflow as tf
from transparent_dist.adapters import tf1
tf1.install()      # idempotent; transparent_dist's import hook calls it
```

- `tf.compat.v1.train.Optimizer.apply_gradients` (so `minimize` too, and
  every optimizer subclass): the gradients are averaged over the ranks
  inside the graph, in one fused exchange each time the train op runs.
- `variables_initializer` (so `global_variables_initializer`,
  `local_variables_initializer` and the Scaffold of
  `MonitoredTrainingSession`): the returned op initializes, then sets every
  variable to rank 0's value.
- `Saver`: `restore` is followed by the same broadcast; `save` writes on
  rank 0 only. `summary.FileWriter` writes on rank 0 only.
- `MonitoredTrainingSession`: ranks other than 0 restore from
  `checkpoint_dir` but write no checkpoints or summaries.
- Preemption (`TD_CHECKPOINT_DIR`, `core.preemption`), for plain session
  loops and `MonitoredTrainingSession` alike: each `Session.run` of a
  train op is a step. At the first one, every global variable is set from
  the latest checkpoint and the train op is left out of the runs the
  checkpoint holds already (the script's loop starts again from its first
  step: the other fetches still run, so its feeds and prints line up).
  After each step the ranks agree; a signal or a due `TD_CHECKPOINT_EVERY`
  writes a checkpoint of every global variable (and exits with 75 on a
  signal).
- The end-of-script summary (`core.loop_summary`, more than one rank):
  each `Session.run` of a train op is a step (its batch size is the
  leading dimension its feeds share) and a `step` span in the timeline.
"""

from __future__ import annotations

import time
import weakref
from typing import Any

import numpy as np
import tensorflow as tf

from transparent_dist.core import (
    collectives,
    log,
    loop_summary,
    output,
    patching,
    preemption,
    step_state,
    world,
)
from transparent_dist.tf import broadcast, exchange, internals

__all__ = ["install", "reset"]


# The name of these loops in the end-of-script summary.
_KIND = "TF1 session loop"


def _wrap_apply_gradients(original: Any) -> Any:
    def apply_gradients(self, grads_and_vars, global_step=None, name=None):
        # Wrapping optimizers call their inner one's: average once.
        if not world.get().distributed or step_state.current().applying:
            return original(self, grads_and_vars, global_step=global_step, name=name)
        pairs = list(grads_and_vars)
        averaged = exchange.average([g for g, _ in pairs])
        with step_state.within(applying=True):
            train_op = original(
                self,
                list(zip(averaged, [v for _, v in pairs], strict=True)),
                global_step=global_step,
                name=name,
            )
        _TRAIN_OPS.add(train_op.name)
        # Stands in for the train op in runs a resumed checkpoint holds
        # (made now: a MonitoredSession finalizes the graph later).
        _SKIPS[train_op.name] = tf.no_op(name="td_skipped_update")
        return train_op

    return apply_gradients


# Names of the train ops built through the patched apply_gradients, and
# whether the check of what the first of them was fed has been made.
_TRAIN_OPS: set[str] = set()
_FED = {"checked": False}
_SKIPS: dict[str, Any] = {}


class _SessionPreemption:
    """A session loop's preemption: the service, the global variables it
    saves, the steps run, and how many a resumed checkpoint holds."""

    def __init__(self, service: preemption.Service, session: Any, run: Any) -> None:
        self.service, self.session, self.run = service, session, run
        self.variables = session.graph.get_collection(tf.compat.v1.GraphKeys.GLOBAL_VARIABLES)
        self.steps = 0
        self.resume_at = 0
        self._signals = preemption.handling_signals()
        self._signals.__enter__()  # for the rest of the process
        self.resume_at = service.resume_replaying(
            self.variables, lambda v, value: v.load(value, session), "training steps of the session"
        )

    def state(self) -> tuple[list[Any] | None, dict]:
        arrays = None
        if world.get().is_root:
            arrays = [np.asarray(a) for a in self.run(self.session, self.variables)]
        return arrays, {"epoch": 0, "step": self.service.global_step, "unit": None}

    def fetches(self, fetches: Any) -> Any:
        """`fetches` for the next step: the train ops left out while the
        resumed checkpoint holds the step."""
        if self.steps >= self.resume_at:
            return fetches
        return tf.nest.map_structure(
            lambda f: _SKIPS.get(getattr(f, "name", None), f), fetches, expand_composites=False
        )

    def after_step(self) -> None:
        self.steps += 1
        if self.steps > self.resume_at:  # not one the checkpoint holds
            self.service.step(self.state, where=f"session step {self.steps}")


_SESSIONS: dict[int, Any] = {}


def _preemption(session: Any, original: Any) -> _SessionPreemption | None:
    key = id(session)
    if key not in _SESSIONS:
        service = preemption.Service.from_settings()
        _SESSIONS[key] = None if service is None else _SessionPreemption(service, session, original)
    return _SESSIONS[key]


def _digest(value: Any) -> str:
    import hashlib

    array = np.ascontiguousarray(np.asarray(value))
    return hashlib.sha1(array.tobytes() + str(array.shape).encode()).hexdigest()


def _trains(fetches: Any) -> bool:
    return any(getattr(f, "name", None) in _TRAIN_OPS for f in tf.nest.flatten(fetches))


def _check_feeds(fetches: Any, feed_dict: Any) -> None:
    """Once, at the first training step: every rank feeding the same values
    means the script's loop uses all the data on every rank (N ranks doing
    one rank's work), which it cannot know."""
    if _FED["checked"] or not feed_dict or not world.get().distributed or not _trains(fetches):
        return
    _FED["checked"] = True
    digest = _digest([_digest(v) for v in feed_dict.values()])
    if len(set(collectives.allgather_object(digest, world.get().comm))) == 1:
        log.info(
            "WARNING: every rank fed the same values to the first training step of "
            "this TF1 session loop: each rank trains on all of the data, so N ranks "
            "repeat one rank's work. Feed each rank its own part: "
            "transparent_dist.data.DataSet(path, ...) or "
            "x[slice(*transparent_dist.shard_range(len(x)))]"
        )


def _wrap_session_run(original: Any) -> Any:
    def run(self, fetches, feed_dict=None, *args, **kwargs):
        if not _TRAIN_OPS or step_state.current().in_session_step or not _trains(fetches):
            return original(self, fetches, feed_dict, *args, **kwargs)
        _check_feeds(fetches, feed_dict)
        started = time.perf_counter()
        steps = _preemption(self, original)
        replayed = steps is not None and steps.steps < steps.resume_at
        if steps is None:
            result = original(self, fetches, feed_dict, *args, **kwargs)
        else:
            with step_state.within(in_session_step=True):
                result = original(self, steps.fetches(fetches), feed_dict, *args, **kwargs)
                steps.after_step()
        if not replayed:
            batch = loop_summary.batch_size((feed_dict or {}).values())
            loop_summary.step_ended(_KIND, batch=batch, started=started)
        return result

    return run


def _wrap_variables_initializer(original: Any) -> Any:
    def variables_initializer(var_list, name="init"):
        init = original(var_list, name=name)
        if not world.get().distributed or tf.executing_eagerly() or not var_list:
            return init
        return broadcast.in_graph(list(var_list), after=init)

    return variables_initializer


# Saver -> the op that sets every global variable to rank 0's value after it
# restores.
_RESTORE_BROADCASTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _wrap_saver_init(original: Any) -> Any:
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        # Built now: a MonitoredSession finalizes the graph before restoring.
        if world.get().distributed and not tf.executing_eagerly():
            variables = tf.compat.v1.global_variables()
            if variables:
                _RESTORE_BROADCASTS[self] = broadcast.in_graph(variables)

    return __init__


def _wrap_restore(original: Any) -> Any:
    def restore(self, sess, save_path):
        result = original(self, sess, save_path)
        op = _RESTORE_BROADCASTS.get(self)
        if op is not None:
            sess.run(op)
        return result

    return restore


class _NoEvents:
    """Stands in for the event file writer on ranks other than 0."""

    def __init__(self, logdir: str) -> None:
        self._logdir = logdir

    def get_logdir(self) -> str:
        return self._logdir

    def add_event(self, event: Any) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def reopen(self) -> None:
        pass


def _wrap_file_writer_init(original: Any) -> Any:
    def __init__(self, logdir, graph=None, *args, **kwargs):
        if world.get().is_root:
            return original(self, logdir, graph, *args, **kwargs)
        self._closed = False
        internals.writer.SummaryToEventTransformer.__init__(
            self, _NoEvents(logdir), graph, kwargs.get("graph_def")
        )

    return __init__


_QUIET = (
    "save_checkpoint_secs",
    "save_checkpoint_steps",
    "save_summaries_steps",
    "save_summaries_secs",
    "log_step_count_steps",
)


def _wrap_monitored_training_session(original: Any) -> Any:
    def MonitoredTrainingSession(*args, **kwargs):  # noqa: N802 - TF's name
        if world.get().distributed and not world.get().is_root:
            for name in _QUIET:
                kwargs[name] = None
            kwargs["summary_dir"] = None
        return original(*args, **kwargs)

    return MonitoredTrainingSession


def reset() -> None:
    """Forgets the sessions, train ops and the feed check
    (`activation.reset`); a session's checkpoint signal handlers, held for
    the rest of the process, give way to the ones before them."""
    for preemptible in reversed([p for p in _SESSIONS.values() if p is not None]):
        preemptible._signals.__exit__(None, None, None)
    _SESSIONS.clear()
    _TRAIN_OPS.clear()
    _SKIPS.clear()
    _FED["checked"] = False


def install() -> None:
    """Installs the TF1 patches (idempotent)."""
    for cls in patching.classes_defining([internals.v1_optimizer.Optimizer], "apply_gradients"):
        patching.wrap(cls, "apply_gradients", _wrap_apply_gradients)
    patching.wrap_everywhere(
        internals.variables.variables_initializer, _wrap_variables_initializer, "tensorflow"
    )
    patching.wrap(internals.session.BaseSession, "run", _wrap_session_run)
    patching.wrap(internals.saver.Saver, "__init__", _wrap_saver_init)
    patching.wrap(internals.saver.Saver, "restore", _wrap_restore)
    patching.wrap(internals.saver.Saver, "save", output.root_only)
    patching.wrap(internals.writer.FileWriter, "__init__", _wrap_file_writer_init)
    patching.wrap_everywhere(
        internals.monitored_session.MonitoredTrainingSession,
        _wrap_monitored_training_session,
        "tensorflow",
    )

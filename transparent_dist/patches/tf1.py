"""TF1-style graphs (`tf.compat.v1`) made data-parallel, installed by
`install()` when TensorFlow is imported.

```python
import tensorflow as tf
from transparent_dist.patches import tf1
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
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.python.client import session as session_module
from tensorflow.python.ops import variables as variables_module
from tensorflow.python.summary.writer import writer as writer_module
from tensorflow.python.training import monitored_session, saver
from tensorflow.python.training import optimizer as v1_optimizer

from transparent_dist import broadcast, gradients, log, output, patching, world
from transparent_dist.patches import common

_distributed = common.distributed


def _wrap_apply_gradients(original: Any) -> Any:
    def apply_gradients(self, grads_and_vars, global_step=None, name=None):
        # Wrapping optimizers call their inner one's: average once.
        if not _distributed() or common.is_set("applying"):
            return original(self, grads_and_vars, global_step=global_step, name=name)
        pairs = list(grads_and_vars)
        averaged = gradients.average([g for g, _ in pairs])
        with common.flag("applying"):
            train_op = original(
                self,
                list(zip(averaged, [v for _, v in pairs], strict=True)),
                global_step=global_step,
                name=name,
            )
        _TRAIN_OPS.add(train_op.name)
        return train_op

    return apply_gradients


# Names of the train ops built through the patched apply_gradients, and
# whether the check of what the first of them was fed has been made.
_TRAIN_OPS: set[str] = set()
_FED = {"checked": False}


def _digest(value: Any) -> str:
    import hashlib

    array = np.ascontiguousarray(np.asarray(value))
    return hashlib.sha1(array.tobytes() + str(array.shape).encode()).hexdigest()


def _wrap_session_run(original: Any) -> Any:
    def run(self, fetches, feed_dict=None, *args, **kwargs):
        if (
            not _FED["checked"]
            and feed_dict
            and _distributed()
            and any(getattr(f, "name", None) in _TRAIN_OPS for f in tf.nest.flatten(fetches))
        ):
            # Once, at the first training step: every rank feeding the same
            # values means the script's loop uses all the data on every
            # rank (N ranks doing one rank's work), which it cannot know.
            _FED["checked"] = True
            digest = _digest([_digest(v) for v in feed_dict.values()])
            if len(set(world.get().comm.allgather(digest))) == 1:
                log.info(
                    "WARNING: every rank fed the same values to the first training step of "
                    "this TF1 session loop: each rank trains on all of the data, so N ranks "
                    "repeat one rank's work. Feed each rank its own part: "
                    "transparent_dist.data.DataSet(path, ...) or "
                    "x[slice(*transparent_dist.shard_range(len(x)))]"
                )
        return original(self, fetches, feed_dict, *args, **kwargs)

    return run


def _wrap_variables_initializer(original: Any) -> Any:
    def variables_initializer(var_list, name="init"):
        init = original(var_list, name=name)
        if not _distributed() or tf.executing_eagerly() or not var_list:
            return init
        return broadcast.in_graph(list(var_list), after=init)

    return variables_initializer


def _wrap_saver_init(original: Any) -> Any:
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        # Built now: a MonitoredSession finalizes the graph before restoring.
        self._td_broadcast = None
        if _distributed() and not tf.executing_eagerly():
            variables = tf.compat.v1.global_variables()
            if variables:
                self._td_broadcast = broadcast.in_graph(variables)

    return __init__


def _wrap_restore(original: Any) -> Any:
    def restore(self, sess, save_path):
        result = original(self, sess, save_path)
        if getattr(self, "_td_broadcast", None) is not None:
            sess.run(self._td_broadcast)
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
        writer_module.SummaryToEventTransformer.__init__(
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
        if _distributed() and not world.get().is_root:
            for name in _QUIET:
                kwargs[name] = None
            kwargs["summary_dir"] = None
        return original(*args, **kwargs)

    return MonitoredTrainingSession


def install() -> None:
    """Installs the TF1 patches (idempotent)."""
    for cls in common.classes_defining([v1_optimizer.Optimizer], "apply_gradients"):
        patching.wrap(cls, "apply_gradients", _wrap_apply_gradients)
    patching.wrap_everywhere(
        variables_module.variables_initializer, _wrap_variables_initializer, "tensorflow"
    )
    patching.wrap(session_module.BaseSession, "run", _wrap_session_run)
    patching.wrap(saver.Saver, "__init__", _wrap_saver_init)
    patching.wrap(saver.Saver, "restore", _wrap_restore)
    patching.wrap(saver.Saver, "save", output.root_only)
    patching.wrap(writer_module.FileWriter, "__init__", _wrap_file_writer_init)
    patching.wrap_everywhere(
        monitored_session.MonitoredTrainingSession, _wrap_monitored_training_session, "tensorflow"
    )

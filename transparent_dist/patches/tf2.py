"""TF2 pieces that custom training loops and custom train steps meet,
installed by `install()` when TensorFlow is imported.

```python
import tensorflow as tf
from transparent_dist.patches import tf2
tf2.install()      # idempotent; transparent_dist's import hook calls it
```

- `tf.GradientTape.gradient` of a target that is not a scalar (a vector of
  per-sample losses, which TensorFlow sums): one process's gradient is then
  a sum over the global batch, so the exchange sums the ranks' gradients
  instead of averaging them (`gradients.target_was_summed`).
- `tf.train.Checkpoint` (so `CheckpointManager` too): files are written by
  rank 0 only; the other ranks get the same return value, and their save
  counters advance alike.
- A `tf.data.Dataset` iterated by the script itself (a custom loop) is not
  split between the ranks: the first update of such a loop says so, once,
  with the one-line fix.
"""

from __future__ import annotations

import threading
from typing import Any

import tensorflow as tf
from tensorflow.python.checkpoint import checkpoint as checkpoint_module
from tensorflow.python.data.ops import dataset_ops

from transparent_dist import gradients, log, patching, world
from transparent_dist.patches import common

_SEEN = {"dataset_iterated": False, "warned": False}


def _is_vector(target: Any) -> bool:
    for leaf in tf.nest.flatten(target):
        shape = getattr(leaf, "shape", None)
        if shape is not None and shape.rank and shape.num_elements() != 1:
            return True
    return False


def _wrap_gradient(original: Any) -> Any:
    def gradient(self, target, sources, *args, **kwargs):
        if common.distributed() and _is_vector(target):
            gradients.target_was_summed()
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
        counted = getattr(self, "_td_on_iter", None)  # see tf_inputs.dataset_batches
        if counted is not None:
            counted()
        if (
            common.distributed()
            and threading.current_thread() is threading.main_thread()
            and not common.is_set("fitting")
            and not common.is_set("keras_call")
        ):
            _SEEN["dataset_iterated"] = True
        return original(self)

    return __iter__


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


def install() -> None:
    """Installs the TF2 patches (idempotent)."""
    patching.wrap(tf.GradientTape, "gradient", _wrap_gradient)
    for cls in (checkpoint_module.Checkpoint, checkpoint_module.CheckpointV1):
        patching.wrap(cls, "_write", _wrap_checkpoint_write)
    patching.wrap(dataset_ops.DatasetV2, "__iter__", _wrap_dataset_iter)

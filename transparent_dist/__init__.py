"""Unmodified Keras / TensorFlow scripts, data-parallel under MPI.

```python
import transparent_dist          # the one line (or: python -m transparent_dist train.py)
import keras
print(transparent_dist.rank(), transparent_dist.size())
```

Importing the package starts the MPI world (only under an MPI launcher),
makes a failing rank end the whole job, keeps standard output to rank 0,
and arranges for the framework patches to be applied when the script
imports Keras or TensorFlow. It does not import either itself.
"""

from __future__ import annotations

from types import ModuleType

from transparent_dist import (
    config,
    failures,
    import_hook,
    output,
    patching,
    sequence,
    signals,
    stall,
    world,
)
from transparent_dist.config import configure
from transparent_dist.gradients import average as average_gradients
from transparent_dist.sharding import shard_range

__version__ = "0.1.0"
__all__ = [
    "activate",
    "average_gradients",
    "configure",
    "deactivate",
    "is_root",
    "local_rank",
    "local_size",
    "rank",
    "shard_range",
    "size",
]


def rank() -> int:
    """This process's rank in the job (0 without MPI)."""
    return world.get().rank


def size() -> int:
    """The number of ranks in the job (1 without MPI)."""
    return world.get().size


def local_rank() -> int:
    """This process's rank among the ranks on its node."""
    return world.get().local_rank


def local_size() -> int:
    """The number of ranks on this process's node."""
    return world.get().local_size


def is_root() -> bool:
    """Whether this process is rank 0, the one that prints and writes."""
    return world.get().rank == 0


def _on_tensorflow(tf: ModuleType) -> None:
    from transparent_dist import placement
    from transparent_dist.patches import tf1, tf2

    placement.apply(tf)
    tf1.install()
    tf2.install()
    w = world.get()
    if w.size == 1:
        return
    from tensorflow.python.eager import context

    # Random ops the script leaves unseeded (a tf.data shuffle, say) must
    # draw alike on every rank, or sharding would drop and repeat samples.
    if context.global_seed() is None:
        import random

        seed = w.comm.bcast(random.randrange(2**31) if w.is_root else None, root=0)
        tf.random.set_seed(seed)


def _on_keras(keras: ModuleType) -> None:
    if keras.backend.backend() != "tensorflow":
        if world.get().size > 1:
            raise RuntimeError(
                "transparent_dist supports the TensorFlow backend of Keras; "
                f"KERAS_BACKEND is {keras.backend.backend()!r}"
            )
        return
    from transparent_dist.patches import keras3

    keras3.install()


def _on_tf_keras(module: ModuleType) -> None:
    from transparent_dist.patches import tf_keras

    tf_keras.install()


_ACTIVE = False


def activate() -> None:
    """Turns the plugin on (done on import; idempotent). `TD_DISABLE=1`
    leaves everything as plain Keras / TensorFlow."""
    global _ACTIVE
    if _ACTIVE or config.SETTINGS.disable:
        return
    _ACTIVE = True
    if world.get().size > 1:
        failures.install()
        signals.install()
        stall.start()
        sequence.install_end_check()
    output.quiet_unless_root()
    import_hook.when_imported("tensorflow", _on_tensorflow)
    import_hook.when_imported("keras", _on_keras)
    import_hook.when_imported("tf_keras", _on_tf_keras)


def deactivate() -> None:
    """Undoes `activate`: every patch, the import hook, the exception hook
    and the standard-output redirection."""
    global _ACTIVE
    import_hook.remove()
    patching.undo_all()
    failures.uninstall()
    sequence.remove_end_check()
    signals.uninstall()
    output.restore()
    _ACTIVE = False


activate()

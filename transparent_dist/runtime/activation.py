"""Turning the plugin on: the job-wide protections at once, the adapters
when the script imports the framework they adapt.

```python
from transparent_dist.runtime import activation
activation.activate()     # done by `import transparent_dist`; idempotent
activation.deactivate()   # every patch, hook and redirection undone, all state reset
activation.activate()     # and on again, as in a fresh process
```

| the script imports | adapters installed |
|--------------------|--------------------|
| `tensorflow`       | placement, `adapters.tf1`, `adapters.custom_loops`, one global seed |
| `keras` (3)        | its backend's: `adapters.keras3_tensorflow` (`KERAS_BACKENDS`) |
| `tf_keras`         | `adapters.tf_keras` |
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

from transparent_dist.core import (
    config,
    failures,
    host_random,
    log,
    output,
    patching,
    phases,
    signals,
    stall,
    world,
)
from transparent_dist.runtime import import_hook

__all__ = ["KERAS_BACKENDS", "RESETS", "activate", "deactivate", "reset"]

# Keras 3's backend (`keras.backend.backend()`) -> the module adapting Keras
# 3 on it (its `install()`), over that backend's `core.backend.Backend`.
# Adding a backend is a line here and its files (docs/architecture.md).
KERAS_BACKENDS = {
    "tensorflow": "transparent_dist.adapters.keras3_tensorflow",
}


def _on_tensorflow(tf: ModuleType) -> None:
    from transparent_dist.adapters import custom_loops, tf1
    from transparent_dist.tf import backprop_order, placement
    from transparent_dist.tf.inputs import seeds

    placement.apply(tf)
    if world.get().size > 1:
        backprop_order.install()
    tf1.install()
    custom_loops.install()
    seeds.agree_on_global_seed(tf)


def _on_keras(keras: ModuleType) -> None:
    adapter = KERAS_BACKENDS.get(keras.backend.backend())
    if adapter is None:
        if world.get().size > 1:
            raise RuntimeError(
                "transparent_dist supports the TensorFlow backend of Keras; "
                f"KERAS_BACKEND is {keras.backend.backend()!r}"
            )
        return
    importlib.import_module(adapter).install()


def _on_tf_keras(module: ModuleType) -> None:
    from transparent_dist.adapters import tf_keras

    tf_keras.install()


_ACTIVE = False


def _say_how_the_job_runs() -> None:
    """Once, from rank 0, what a new user otherwise wonders about: where the
    other ranks' output went, and why 3 ranks on 2 cores crawl."""
    import os

    w = world.get()
    if w.size == 1:
        return
    if config.SETTINGS.stdout == "root":
        log.info(
            f"{w.size} ranks; only rank 0 prints (the others' standard output is hidden: "
            "TD_STDOUT=all shows it)"
        )
    # The node's cores, not this rank's affinity: a launcher that binds
    # each rank to one core is not oversubscribing.
    cores = os.cpu_count()
    if cores and w.local_size > cores and w.local_rank == 0:
        log.warning(
            f"{w.local_size} ranks share this node's {cores} core(s): oversubscribed, every "
            "step waits for a share of a core (expect it slower than fewer ranks; waiting "
            "ranks sleep instead of spinning, MPIR_CVAR_ENABLE_HEAVY_YIELD=1 for MPICH)"
        )


def _running_the_doctor() -> bool:
    """`python -m transparent_dist doctor` (while Python imports the package
    on the way to its `__main__`, `sys.argv[0]` is "-m")."""
    return sys.argv[:1] == ["-m"] and sys.argv[1:2] == ["doctor"]


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
        phases.install_end_check()
    # Bad, misspelt or (between ranks) different settings end the job now,
    # not at the walltime; the doctor reports them instead.
    if not _running_the_doctor():
        phases.check_settings()
        host_random.agree()
        _say_how_the_job_runs()
    output.quiet_unless_root()
    # TensorFlow's C++ start-up lines, once (rank 0), not once per rank.
    import_hook.around_import("tensorflow", output.start_up_quietly)
    import_hook.when_imported("tensorflow", _on_tensorflow)
    import_hook.when_imported("keras", _on_keras)
    import_hook.when_imported("tf_keras", _on_tf_keras)


def deactivate() -> None:
    """Undoes `activate`: every patch, the import hook, the exception hook
    and the standard-output redirection; then forgets all state (`reset`),
    so `activate` starts afresh."""
    global _ACTIVE
    import_hook.remove()
    patching.undo_all()
    failures.uninstall()
    phases.remove_end_check()
    signals.uninstall()
    output.restore()
    reset()
    _ACTIVE = False


# The modules holding state, each with a `reset()`, in the order they are
# reset: the threads that poll MPI stop first; the adapters let go of what
# they hold (signal handlers, sessions) before the exchange, the native op
# and the core forget theirs; the world, which the others read, goes last.
RESETS = (
    "transparent_dist.core.stall",
    "transparent_dist.core.listener",
    "transparent_dist.core.elastic",
    "transparent_dist.core.phases",
    "transparent_dist.adapters.tf1",
    "transparent_dist.adapters.custom_loops",
    "transparent_dist.adapters.fit_start",
    "transparent_dist.tf.backprop_order",
    "transparent_dist.tf.exchange",
    "transparent_dist.tf.native.op",
    "transparent_dist.tf.native.build",
    "transparent_dist.core.step_state",
    "transparent_dist.core.collectives",
    "transparent_dist.core.loop_summary",
    "transparent_dist.core.timeline_file",
    "transparent_dist.core.timeline",
    "transparent_dist.core.progress",
    "transparent_dist.core.log",
    "transparent_dist.core.world",
)


def reset() -> None:
    """Forgets the state of every module in `RESETS` that this process has
    imported (one that is not has none, and importing it could import
    TensorFlow). Called by `deactivate`, with the plugin's patches and hooks
    already off. MPI is never finalized and a world of several ranks is
    kept (`world.reset`); every rank must call it, and `activate` after it,
    at the same point, as it does the first `activate`."""
    for name in RESETS:
        module = sys.modules.get(name)
        if module is not None:
            module.reset()

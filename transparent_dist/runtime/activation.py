"""Turning the plugin on: the job-wide protections at once, the adapters
when the script imports the framework they adapt.

```python
from transparent_dist.runtime import activation
activation.activate()     # done by `import transparent_dist`; idempotent
activation.deactivate()   # every patch, hook and redirection undone
```

| the script imports | adapters installed |
|--------------------|--------------------|
| `tensorflow`       | placement, `adapters.tf1`, `adapters.custom_loops`, one global seed |
| `keras` (3)        | `adapters.keras3` |
| `tf_keras`         | `adapters.tf_keras` |
"""

from __future__ import annotations

import sys
from types import ModuleType

from transparent_dist.core import (
    config,
    failures,
    host_random,
    log,
    output,
    patching,
    sequence,
    signals,
    stall,
    world,
)
from transparent_dist.runtime import import_hook

__all__ = ["activate", "deactivate"]


def _on_tensorflow(tf: ModuleType) -> None:
    from transparent_dist.adapters import custom_loops, tf1
    from transparent_dist.tf import placement
    from transparent_dist.tf.inputs import seeds

    placement.apply(tf)
    tf1.install()
    custom_loops.install()
    seeds.agree_on_global_seed(tf)


def _on_keras(keras: ModuleType) -> None:
    if keras.backend.backend() != "tensorflow":
        if world.get().size > 1:
            raise RuntimeError(
                "transparent_dist supports the TensorFlow backend of Keras; "
                f"KERAS_BACKEND is {keras.backend.backend()!r}"
            )
        return
    from transparent_dist.adapters import keras3

    keras3.install()


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
        sequence.install_end_check()
    # Bad, misspelt or (between ranks) different settings end the job now,
    # not at the walltime; the doctor reports them instead.
    if not _running_the_doctor():
        sequence.check_settings()
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
    and the standard-output redirection."""
    global _ACTIVE
    import_hook.remove()
    patching.undo_all()
    failures.uninstall()
    sequence.remove_end_check()
    signals.uninstall()
    output.restore()
    _ACTIVE = False

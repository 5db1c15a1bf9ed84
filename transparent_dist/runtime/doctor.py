"""`python -m transparent_dist doctor`: what a job sees, from inside it.

```
mpiexec -n 2 python -m transparent_dist doctor      # or: tdrun -n 2 --doctor
```

Prints (rank 0, gathered from all ranks): the MPI library and world, the
ranks per node, TensorFlow / Keras versions and which patches apply, each
rank's devices and threads, a quick allreduce bandwidth figure, the
settings in force, and a verdict line: `verdict: ok`, or what to fix (bad
or misspelt settings, settings that differ between ranks); the status is 1
then.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import socket
import sys
import time

import numpy as np

from transparent_dist.core import config
from transparent_dist.runtime import activation

__all__ = ["main"]


def main() -> int:
    import transparent_dist
    from transparent_dist.core import collectives, world

    w = world.get()
    lines = [
        f"transparent_dist {transparent_dist.__version__}, Python {platform.python_version()}, "
        f"{platform.system()} {platform.machine()}"
    ]
    if w.comm is None:
        lines += _mpi_outside_a_job()
    else:
        library, version = world.mpi_library()
        lines.append(f"MPI: {library}; mpi4py {version}; thread level {world.thread_level()}")
    lines.append(f"world: {w.size} rank(s)")

    import tensorflow as tf

    lines.append(f"TensorFlow {tf.__version__}")
    patches = ["tf1 (tf.compat.v1 optimizers, initializers, Saver, FileWriter)"]
    try:
        import keras

        backend = keras.backend.backend()
        lines.append(f"Keras {keras.__version__} (backend {backend})")
        if backend in activation.KERAS_BACKENDS:
            patches.insert(0, "keras3 (fit/evaluate/predict, optimizers, metrics, saving)")
    except ImportError:
        lines.append("Keras 3: not installed")
    try:
        import tf_keras

        lines.append(
            f"tf_keras {tf_keras.__version__} (TF_USE_LEGACY_KERAS="
            f"{os.environ.get('TF_USE_LEGACY_KERAS', 'unset')})"
        )
        patches.append("tf_keras (the same as keras3, for Keras 2)")
    except ImportError:
        pass
    lines.append("patches that apply: " + "; ".join(patches))

    me = {
        "rank": w.rank,
        "host": socket.gethostname(),
        "local": f"{w.local_rank}/{w.local_size}",
        "devices": [d.name for d in tf.config.get_visible_devices()],
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads() or "default",
        "cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "settings": config.shared(),
        "problems": _setting_problems(),
    }
    everyone = collectives.gather_object(me, w.comm)
    bandwidth = None
    if w.comm is not None and w.size > 1:
        buf = np.ones(2 * 1024 * 1024, np.float32)  # 8 MB
        collectives.allreduce_in_place(buf, w.comm)
        collectives.barrier(w.comm)
        start = time.perf_counter()
        for _ in range(10):
            collectives.allreduce_in_place(buf, w.comm)
        seconds = (time.perf_counter() - start) / 10
        bandwidth = (buf.nbytes / seconds / 1e9, seconds * 1e3)
    exchange = _exchange_path(w.size)
    if not w.is_root:
        return 0
    lines.append(f"gradient exchange: {exchange}")
    nodes: dict[str, list[int]] = {}
    for entry in everyone:
        nodes.setdefault(entry["host"], []).append(entry["rank"])
    lines.append(
        "ranks per node: "
        + "; ".join(f"{h}: {len(r)} (ranks {', '.join(map(str, r))})" for h, r in nodes.items())
    )
    for entry in everyone:
        lines.append(
            f"  rank {entry['rank']} on {entry['host']} (local {entry['local']}): "
            f"{entry['cores']} core(s), intra-op threads {entry['intra_op_threads']}, "
            f"devices {', '.join(entry['devices'])}"
        )
    if bandwidth:
        lines.append(f"allreduce of 8 MB float32: {bandwidth[1]:.2f} ms ({bandwidth[0]:.2f} GB/s)")
    problems = _settings_report(everyone, lines)
    lines.append("verdict: ok" if not problems else "verdict: fix " + "; ".join(problems))
    print("\n".join(lines), file=sys.stdout, flush=True)
    return 1 if problems else 0


def _setting_problems() -> list[str]:
    """This rank's bad values and misspelt `TD_*` names."""
    problems = [e.removeprefix("transparent_dist: ") for e in config.ERRORS]
    problems += [
        f"{name} is not a setting (did you mean {close}?)"
        for name, close in config.unknown_names()
        if close is not None
    ]
    return problems


def _settings_report(everyone: list[dict], lines: list[str]) -> list[str]:
    """Appends the settings in force (rank 0's, those set marked) to
    `lines`; returns the problems of any rank, and the settings that differ
    between ranks."""
    lines.append("settings in force on rank 0 (TD_*; README: Settings):")
    for field in dataclasses.fields(config.Settings):
        value = getattr(config.SETTINGS, field.name)
        mark = "" if value == field.default else "   (set)"
        lines.append(f"  TD_{field.name.upper()}={value!r}{mark}")
    problems = list(dict.fromkeys(p for entry in everyone for p in entry["problems"]))
    for name, value in everyone[0]["settings"].items():
        differ = [e["rank"] for e in everyone if e["settings"].get(name) != value]
        if differ:
            problems.append(
                f"{name} differs between ranks (rank 0: {value!r}; other on rank(s) "
                f"{', '.join(map(str, differ[:8]))})"
            )
    return problems


def _exchange_path(size: int) -> str:
    """Which gradient exchange a job of `size` ranks uses (collective when
    size > 1); on one process, whether the native op builds."""
    from transparent_dist.tf import native

    if size > 1:
        native.load()
        return native.status()
    try:
        return f"native op builds ({native.build()}); one process exchanges nothing"
    except Exception as error:  # noqa: BLE001 - reported, not raised
        return f"numpy fallback: the native op does not build ({error})"


def _mpi_outside_a_job() -> list[str]:
    """On a login node: the MPI library a job would use, the launcher
    `tdrun` would pick, and whether the two are of one family (a launcher
    of another MPI starts N separate one-rank worlds)."""
    from transparent_dist.core import world
    from transparent_dist.runtime import launcher

    lines = ["MPI: not started (not launched by mpiexec/srun; TD_MPI=on forces it)"]
    try:
        library, version = world.mpi_library()
    except Exception as error:  # noqa: BLE001 - reported, not raised
        return [*lines, f"  mpi4py cannot load an MPI library: {error}"]
    lines.append(f"  library a job would use: {library} (mpi4py {version})")
    try:
        kind, path = launcher.find_launcher()
    except SystemExit as error:
        return [*lines, f"  launcher: none ({error})"]
    family, launched_by = launcher.family_of_library(library), launcher.flavour(path)
    lines.append(f"  launcher tdrun would use: {path} ({launched_by})")
    if launched_by == "srun" or "unknown" in (family, launched_by):
        lines.append("  launcher and library: cannot tell whether they match")
    elif family == launched_by:
        lines.append(f"  launcher and library: match ({family})")
    else:
        lines.append(
            f"  launcher and library: MISMATCH ({launched_by} launcher, {family} library): "
            "every rank would start a world of its own; use the launcher of the same MPI"
        )
    return lines

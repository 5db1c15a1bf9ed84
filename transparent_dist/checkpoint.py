"""Checkpoints that a kill mid-write cannot corrupt, and the signals that
ask for one (Slurm's SIGTERM at the walltime, or `--signal=USR1@120`).

```python
import numpy as np
from transparent_dist import checkpoint
checkpoint.save("/tmp/ckpt", [np.zeros(3)], {"epoch": 1, "step": 0, "global_step": 10})
arrays, meta = checkpoint.load_latest("/tmp/ckpt")
```

A checkpoint is a directory `ckpt-<global step>` holding `arrays.npz` and
`meta.json`. It is written under a temporary name, flushed to disk, and only
then renamed; the file `latest` names the newest complete one and is itself
replaced by rename. A kill at any moment leaves the previous checkpoint
named by `latest`. Rank 0 writes; every rank reads.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
from typing import Any

import numpy as np

LATEST = "latest"
# Exit status of a job that checkpointed on request: "temporary failure,
# try again" (EX_TEMPFAIL), so a batch script can requeue on it.
PREEMPTED_STATUS = 75


class Preempted(SystemExit):
    """Raised on every rank once the checkpoint asked for by a signal is
    written; the process exits with PREEMPTED_STATUS."""

    def __init__(self) -> None:
        super().__init__(PREEMPTED_STATUS)


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_payload(directory: str, arrays: list[np.ndarray], meta: dict) -> None:
    with open(os.path.join(directory, "arrays.npz"), "wb") as f:
        np.savez(f, *arrays)
        f.flush()
        os.fsync(f.fileno())
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())


def save(directory: str, arrays: list[np.ndarray], meta: dict, keep: int = 3) -> str:
    """Writes a checkpoint atomically and points `latest` at it; keeps the
    newest `keep`. Returns its path."""
    os.makedirs(directory, exist_ok=True)
    name = f"ckpt-{int(meta['global_step']):012d}"
    final = os.path.join(directory, name)
    temporary = os.path.join(directory, f".{name}.partial-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    os.makedirs(temporary)
    _write_payload(temporary, arrays, meta)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(temporary, final)
    pointer = os.path.join(directory, f".{LATEST}.partial-{os.getpid()}")
    with open(pointer, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer, os.path.join(directory, LATEST))
    _fsync_directory(directory)
    from transparent_dist import log

    log.debug(f"checkpoint written: {final}")
    for old in sorted(_complete(directory))[:-keep]:
        shutil.rmtree(os.path.join(directory, old), ignore_errors=True)
    return final


def _complete(directory: str) -> list[str]:
    return [n for n in os.listdir(directory) if n.startswith("ckpt-")]


def latest_path(directory: str) -> str | None:
    """The newest complete checkpoint in `directory`, or None."""
    if not directory or not os.path.isdir(directory):
        return None
    try:
        with open(os.path.join(directory, LATEST)) as f:
            name = f.read().strip()
        if os.path.isfile(os.path.join(directory, name, "meta.json")):
            return os.path.join(directory, name)
    except OSError:
        pass
    # No pointer (it is written last): the newest directory that was renamed
    # into place is complete.
    names = sorted(_complete(directory))
    return os.path.join(directory, names[-1]) if names else None


def peek(directory: str) -> dict | None:
    """The metadata of the latest checkpoint, or None."""
    path = latest_path(directory)
    if path is None:
        return None
    with open(os.path.join(path, "meta.json")) as f:
        return json.load(f)


def load_latest(directory: str) -> tuple[list[np.ndarray], dict] | None:
    """`(arrays, meta)` of the latest checkpoint, or None."""
    path = latest_path(directory)
    if path is None:
        return None
    with np.load(os.path.join(path, "arrays.npz")) as data:
        arrays = [data[f"arr_{i}"] for i in range(len(data.files))]
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    meta["path"] = path
    return arrays, meta


# ---------------------------------------------------------------- signals

_REQUESTED = threading.Event()
_INSTALLED = False


def _on_signal(number: int, frame: Any) -> None:
    if not _REQUESTED.is_set():
        sys.stderr.write(
            f"transparent_dist: {signal.Signals(number).name} received; a checkpoint "
            f"will be written at the next step, then the job exits\n"
        )
    _REQUESTED.set()


def install_signal_handlers() -> None:
    """SIGTERM and SIGUSR1 ask for a checkpoint and exit (idempotent; only
    from the main thread)."""
    global _INSTALLED
    if _INSTALLED or threading.current_thread() is not threading.main_thread():
        return
    for number in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(number, _on_signal)
    _INSTALLED = True


def requested() -> bool:
    """Whether this rank received a checkpoint-and-exit signal."""
    return _REQUESTED.is_set()


def parse_every(value: str) -> tuple[int, float]:
    """`TD_CHECKPOINT_EVERY`: "500" (steps) or "600s" (seconds) -> (steps, seconds)."""
    value = (value or "").strip().lower()
    if not value or value == "0":
        return 0, 0.0
    try:
        if value.endswith("s"):
            return 0, float(value[:-1])
        return int(value), 0.0
    except ValueError:
        raise ValueError(
            f"transparent_dist: TD_CHECKPOINT_EVERY={value!r} is neither steps (500) "
            "nor seconds (600s)"
        ) from None

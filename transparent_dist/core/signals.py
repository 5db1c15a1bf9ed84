"""Signals to one rank end the whole job, even while it waits in a collective.

```python
from transparent_dist.core import signals
signals.install()     # done by `import transparent_dist` in a job of size > 1
```

SIGINT (Ctrl-C, or `kill -INT` of one rank) raises KeyboardInterrupt as
usual, which `failures` turns into the end of the job (status 130). SIGTERM
without `TD_CHECKPOINT_DIR` ends the job with status 143, as a shell reports
a process it killed (under `mpiexec` a rank killed by it would leave the
job's status at 15 and the other ranks to be cleaned up). While `fit`
checkpoints (`preemption.handling_signals`), SIGTERM and SIGUSR1 ask for a
checkpoint instead. SIGUSR1 anywhere else (Slurm's warning arriving while
the script writes its results after `fit`) is said and ignored rather than
killing the rank. A script's own handlers are left alone.

Python runs signal handlers only between bytecodes of the main thread,
which may be blocked in a collective that will never complete (the other
ranks wait for this one). So the handlers also write to a pipe
(`signal.set_wakeup_fd`) that the listener thread (`listener`, started by
`install`) polls; if the main thread has not ended the job `_GRACE_SECONDS`
after the signal, the listener prints its stack and does.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

from transparent_dist.core import listener, stacks, world

__all__ = ["install", "poll", "uninstall"]

TERMINATED_STATUS = 143
_GRACE_SECONDS = 3.0
_STATE: dict[str, Any] = {"pipe": None, "previous": {}, "pending": {}}


def _on_sigterm(number: int, frame: Any) -> None:
    _end(number)


def _on_sigusr1(number: int, frame: Any) -> None:
    # Slurm's early warning (--signal=USR1@120). Inside a fit with
    # TD_CHECKPOINT_DIR it asks for a checkpoint (`preemption`); anywhere
    # else there is nothing to checkpoint, and the default action (death,
    # status 138) would lose what the script is writing after fit.
    w = world.get()
    if w.is_root:
        sys.stderr.write(
            "transparent_dist: SIGUSR1 received outside a fit that checkpoints (nothing to "
            "checkpoint now): ignored, the script goes on until the batch system ends it\n"
        )


def _end(number: int) -> None:
    from transparent_dist.core import failures

    w = world.get()
    name = signal.Signals(number).name
    status = TERMINATED_STATUS if number == signal.SIGTERM else failures.INTERRUPTED_STATUS
    sys.stderr.write(
        f"transparent_dist: rank {w.rank} of {w.size} received {name}; ending all ranks of "
        f"the job with status {status}\n"
    )
    world.abort(status)


def install() -> None:
    """Installs the SIGTERM handler (where the script has none) and the
    wake-up pipe (where nothing else uses one); main thread only."""
    if _STATE["pipe"] is not None or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        _STATE["previous"][signal.SIGTERM] = signal.signal(signal.SIGTERM, _on_sigterm)
    if signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL:
        _STATE["previous"][signal.SIGUSR1] = signal.signal(signal.SIGUSR1, _on_sigusr1)
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    try:
        previous_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    except ValueError:
        previous_fd = None
    if previous_fd != -1:  # another user of the wake-up fd (asyncio): leave it
        if previous_fd is not None:
            signal.set_wakeup_fd(previous_fd)
        os.close(read)
        os.close(write)
        return
    _STATE["pipe"] = (read, write)
    listener.register(poll)
    listener.start()


def uninstall() -> None:
    for number, previous in _STATE["previous"].items():
        if signal.getsignal(number) in (_on_sigterm, _on_sigusr1):
            signal.signal(number, previous)
    _STATE["previous"].clear()
    _STATE["pending"].clear()  # a signal noted before must not end a later activation
    if _STATE["pipe"] is not None and threading.current_thread() is threading.main_thread():
        listener.unregister(poll)
        signal.set_wakeup_fd(-1)
        for fd in _STATE["pipe"]:
            os.close(fd)
        _STATE["pipe"] = None


def poll() -> None:
    """A listener poller: ends the job for a SIGINT or SIGTERM that the
    blocked main thread has not acted on in time."""
    pipe = _STATE["pipe"]
    if pipe is None:
        return
    try:
        received = os.read(pipe[0], 64)
    except (BlockingIOError, OSError):
        received = b""
    now = time.monotonic()
    for number in received:
        if number in (signal.SIGINT, signal.SIGTERM) and _ends_job(number):
            _STATE["pending"].setdefault(number, now)
    for number, since in list(_STATE["pending"].items()):
        if now - since >= _GRACE_SECONDS:
            sys.stderr.write(
                f"transparent_dist: rank {world.get().rank}: the main thread did not act on "
                f"{signal.Signals(number).name} within {_GRACE_SECONDS:g} s; it is here:\n"
                + stacks.main_thread_stack()
            )
            _end(number)


def _ends_job(number: int) -> bool:
    """Whether the handler now installed for `number` is one that ends the
    job (ours, or Python's KeyboardInterrupt), not a script's own or the
    checkpoint request."""
    handler = signal.getsignal(number)
    return handler is _on_sigterm or handler is signal.default_int_handler

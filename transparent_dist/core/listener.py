"""One thread on every rank that does what the main thread may be too blocked to do.

```python
from transparent_dist.core import listener
listener.register(signals.poll)   # `signals`: a SIGTERM the main thread sits on
listener.start()                  # idempotent; `stall.start` registers its own
```

The main thread of a rank can sit in a collective that never completes (the
other ranks wait for it, or it waits for them), where Python runs no signal
handler and no Python code at all. So every `_POLL_SECONDS` this thread calls
the registered pollers: `signals` (a SIGINT or SIGTERM the main thread has
not acted on ends the job after a grace period), and, once the stall
watchdog has started, its own (the native op's count of collectives, a
watcher's request for this rank's stack). The pollers register themselves;
the listener knows none of them, so its users need not know each other.
It stops (`stop`) before MPI is finalized: a thread polling MPI after that
would crash the process.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from transparent_dist.core import collectives

__all__ = ["register", "reset", "running", "start", "stop", "unregister"]

_POLL_SECONDS = 0.2
_POLLERS: list[Callable[[], None]] = []
_LOCK = threading.Lock()
_STOP = threading.Event()
_THREAD: list[threading.Thread] = []


def register(poller: Callable[[], None]) -> None:
    """Calls `poller()` on the listener thread every `_POLL_SECONDS` (once,
    however often it is registered)."""
    with _LOCK:
        if poller not in _POLLERS:
            _POLLERS.append(poller)


def unregister(poller: Callable[[], None]) -> None:
    """Stops calling `poller` (after the round in progress, if any)."""
    with _LOCK:
        if poller in _POLLERS:
            _POLLERS.remove(poller)


def _listen() -> None:
    while not _STOP.wait(_POLL_SECONDS):
        with _LOCK:
            pollers = list(_POLLERS)
        for poller in pollers:
            try:
                poller()
            except Exception as error:
                # A poller's MPI call that met a lost rank: the main thread
                # meets it too, and recovers (`elastic`) or ends the job.
                if not collectives.is_process_failure(error):
                    raise


def start() -> None:
    """Starts the listener thread (a daemon); idempotent."""
    if _THREAD:
        return
    _STOP.clear()
    thread = threading.Thread(target=_listen, name="transparent_dist-listener", daemon=True)
    _THREAD.append(thread)
    thread.start()


def running() -> bool:
    """Whether the listener thread has been started and not stopped."""
    return bool(_THREAD)


def stop() -> None:
    """Stops the listener thread and waits for it (unless called from it)."""
    _STOP.set()
    for thread in _THREAD:
        if thread is not threading.current_thread():
            thread.join(timeout=5 * _POLL_SECONDS + 1)
    _THREAD.clear()


def reset() -> None:
    """Stops the thread and forgets every poller (`activation.reset`)."""
    stop()
    with _LOCK:
        _POLLERS.clear()

"""Where a rank's time goes: counters for the end-of-fit summary, and an
optional per-rank timeline (`TD_TIMELINE=path`) in Chrome trace format.

```python
from transparent_dist.core import timeline
with timeline.span("exchange"):
    ...
timeline.STATS.exchange_seconds
```

Open the files (one per rank: `path.rank<r>.json`) in chrome://tracing or
https://ui.perfetto.dev. Spans: `step` (a whole training step, as Keras's
callbacks see it), `wait` (a rank waiting for the others to reach the
gradient exchange), `exchange` (gradient averaging; in the numpy fallback
split into `copy`, `allreduce`, `copy back`), `metrics` (metric sums),
`read` (file-backed batches).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
import time
from collections.abc import Iterator

from transparent_dist.core import config, world

__all__ = ["STATS", "Stats", "add", "add_source", "recording", "reset", "span", "stats", "write"]


@dataclasses.dataclass
class Stats:
    """Counters since the last `reset` (this rank)."""

    # Gradient exchange proper; with the native op, from the moment every
    # rank has arrived (the time before that is `wait_seconds`: another
    # rank was late, which is load imbalance, not communication).
    exchange_seconds: float = 0.0
    wait_seconds: float = 0.0
    # The part of `exchange_seconds` spent inside MPI_Allreduce.
    reduce_seconds: float = 0.0
    exchange_bytes: float = 0
    exchanges: int = 0
    samples: float = 0.0


# Counters of the Python-side (numpy) exchange; `stats()` adds the others.
STATS = Stats()
_EVENTS: list[dict] = []
_LOCK = threading.Lock()
_ORIGIN = time.perf_counter()
# Other producers of counters and spans (the native op): objects with
# counters() -> dict, reset() and spans() -> [(name, start, end)].
_SOURCES: list = []


def add_source(source: object) -> None:
    _SOURCES.append(source)


def stats() -> Stats:
    """This rank's counters since the last `reset`, from every source."""
    total = dataclasses.replace(STATS)
    for source in _SOURCES:
        for name, value in source.counters().items():
            setattr(total, name, getattr(total, name) + value)
    return total


def reset() -> None:
    global STATS
    STATS = Stats()
    for source in _SOURCES:
        source.reset()


def recording() -> bool:
    return bool(config.SETTINGS.timeline)


def add(name: str, start: float, end: float, thread: str | None = None) -> None:
    """Records a span (perf_counter seconds) when a timeline is asked for."""
    if not recording():
        return
    event = {
        "name": name,
        "ph": "X",
        "ts": (start - _ORIGIN) * 1e6,
        "dur": (end - start) * 1e6,
        "pid": world.get().rank,
        "tid": thread or threading.current_thread().name,
    }
    with _LOCK:
        _EVENTS.append(event)


@contextlib.contextmanager
def span(name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        add(name, start, time.perf_counter())


def write() -> str | None:
    """Writes this rank's timeline file; returns its path."""
    if not recording():
        return None
    for source in _SOURCES:
        for name, start, end in source.spans():
            add(name, start, end, thread="gradient exchange")
    path = f"{config.SETTINGS.timeline}.rank{world.get().rank}.json"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with _LOCK:
        events = list(_EVENTS)
    from transparent_dist.core import files

    files.write_atomically(
        path, json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}).encode()
    )
    return path

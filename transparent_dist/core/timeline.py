"""Where a rank's time goes: counters for the end-of-fit and end-of-loop
summaries, and an optional timeline of the whole job (`TD_TIMELINE=path`)
in Chrome trace format.

```python
from transparent_dist.core import timeline
with timeline.span("exchange"):
    ...
timeline.STATS.exchange_seconds
```

Open the file (one for the job, every rank's spans on rank 0's clock, one
process per rank: `timeline_file`) in chrome://tracing or
https://ui.perfetto.dev. Spans: `step` (a whole training step, as Keras's
callbacks see it), `wait` (a rank waiting for the others to reach the
gradient exchange; with the native op, the step's sample-count round trip,
at the start of the step), `exchange` (gradient averaging; with the native
op one per bucket, its number in the span's args, on the thread "gradient
exchange", and `queued` before it: from the bucket's gradients existing to
its exchange starting, so a bucket exchanged while the backward pass still
computes shows as an `exchange` ending before the step's last bucket is
queued; in the numpy fallback split into `copy`, `allreduce`, `copy
back`), `metrics` (metric sums),
`read` (file-backed batches), `op build` (this rank compiled the native
op) or `op load` (it loaded the op, after waiting for any rank compiling it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator

from transparent_dist.core import config, world

__all__ = [
    "STATS",
    "Stats",
    "add",
    "add_build",
    "add_source",
    "recording",
    "reset",
    "restart_counters",
    "span",
    "stats",
    "take_events",
    "totals",
]


@dataclasses.dataclass
class Stats:
    """Counters since the last `restart_counters` (this rank)."""

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
    # Making the native op ready (`add_build`): seconds this rank spent
    # (compiling it, or waiting for the rank that did), and its compilations.
    build_seconds: float = 0.0
    builds: int = 0


# Counters of the Python-side (numpy) exchange; `stats()` adds the others.
STATS = Stats()
_EVENTS: list[dict] = []
_LOCK = threading.Lock()
_ORIGIN = time.perf_counter()
# Other producers of counters and spans (the native op): objects with
# counters() -> dict, reset() and spans() -> [(name, start, end[, args])].
_SOURCES: list = []


def add_source(source: object) -> None:
    _SOURCES.append(source)


def stats() -> Stats:
    """This rank's counters since the last `restart_counters`, from every source."""
    total = dataclasses.replace(STATS)
    for source in _SOURCES:
        for name, value in source.counters().items():
            setattr(total, name, getattr(total, name) + value)
    return total


def restart_counters() -> None:
    """Starts new counters (a fit's summary counts its own), keeping the
    old ones in `totals`."""
    global STATS
    # Kept for `totals`: a fit starting inside a custom loop resets the
    # counters the loop's summary reads.
    now = stats()
    for field in dataclasses.fields(Stats):
        name = field.name
        setattr(_CARRIED, name, getattr(_CARRIED, name) + getattr(now, name))
    STATS = Stats()
    for source in _SOURCES:
        source.reset()


_CARRIED = Stats()


def totals() -> Stats:
    """This rank's counters since the process started (or the last `reset`)."""
    now = stats()
    for field in dataclasses.fields(Stats):
        setattr(now, field.name, getattr(now, field.name) + getattr(_CARRIED, field.name))
    return now


def reset() -> None:
    """Forgets every counter, span and source (`activation.reset`); the
    clock origin stays, so spans recorded after it line up with earlier ones."""
    global STATS, _CARRIED
    with _LOCK:
        _EVENTS.clear()
    STATS = Stats()
    _CARRIED = Stats()
    _SOURCES.clear()  # a source's own counters are its module's reset


def recording() -> bool:
    return bool(config.SETTINGS.timeline)


def add(
    name: str, start: float, end: float, thread: str | None = None, args: dict | None = None
) -> None:
    """Records a span (perf_counter seconds) when a timeline is asked for;
    `args` are shown with it (e.g. a bucket's number)."""
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
    if args:
        event["args"] = args
    with _LOCK:
        _EVENTS.append(event)


def add_build(start: float, end: float, compiled: bool) -> None:
    """Records the making of the native op on this rank, from `start` to
    `end` (perf_counter seconds); `compiled`: this rank ran the compiler.
    A one-time cost, which the fit summary leaves out of its rate."""
    STATS.build_seconds += end - start
    STATS.builds += int(compiled)
    add("op build" if compiled else "op load", start, end)


@contextlib.contextmanager
def span(name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        add(name, start, time.perf_counter())


def take_events() -> tuple[float, list[dict]]:
    """This rank's clock origin (perf_counter seconds; events' `ts` are
    microseconds after it) and the events recorded since the last call,
    the native op's spans included; they are handed over, not kept."""
    for source in _SOURCES:
        for name, start, end, *args in source.spans():
            add(name, start, end, thread="gradient exchange", args=args[0] if args else None)
    with _LOCK:
        events = list(_EVENTS)
        _EVENTS.clear()
    return _ORIGIN, events

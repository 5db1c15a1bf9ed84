"""The job's one timeline file (`TD_TIMELINE=path`): every rank's spans on
rank 0's clock, one process per rank, written by rank 0.

```python
from transparent_dist.core import timeline_file
path = timeline_file.write()     # every rank, at a point all reach together
```

The file is `path` (`path.json` unless `path` ends in `.json`), in Chrome
trace format (chrome://tracing, https://ui.perfetto.dev): process `r` is
rank r, named "rank r" by a `process_name` event, with one track per
thread. Each write gathers the spans the ranks recorded since the last one
to rank 0 (a gather at the end of each fit and at the end of the script,
points every rank reaches together, so the collectives cannot pair with
anything else), puts them on rank 0's clock (`clocks`: each rank's offset
measured then), and rewrites the whole file under a temporary name renamed
over the final one, so a reader never sees half a file. Gathering, rather
than one file per rank merged by rank 0, needs no file system shared
between the nodes. `TD_TIMELINE` may be set on some ranks only: those
record; the file goes where rank 0's setting says (else the lowest
recording rank's).
"""

from __future__ import annotations

import json
import os
from typing import Any

from transparent_dist.core import clocks, collectives, config, files, log, timeline, world

__all__ = ["path_for", "reset", "write", "written"]

# Rank 0: every span written so far, on its clock, and the thread tracks.
_EVENTS: list[dict] = []
_THREADS: dict[tuple[int, str], int] = {}
_RANKS: set[int] = set()
_WRITTEN: list[str] = []


def reset() -> None:
    """Forgets the spans gathered so far (`activation.reset`): the next
    write starts the file afresh."""
    _EVENTS.clear()
    _THREADS.clear()
    _RANKS.clear()
    _WRITTEN.clear()


def written() -> bool:
    """Whether this process (rank 0) has written the file before (its path
    has been said: the caller of `write` prints it)."""
    return bool(_WRITTEN)


def path_for(setting: str) -> str:
    """The file a `TD_TIMELINE` value names."""
    return setting if setting.endswith(".json") else setting + ".json"


def write(comm: Any = None) -> str | None:
    """Adds every rank's new spans to the job's one timeline file, written
    by rank 0; returns its path on rank 0 when it wrote it. Collective on
    `comm` (by default `World.control_comm`) when there is more than one
    rank: every rank calls it at the same point (the end of a fit, the end
    of the script). A file that cannot be written is a warning, not the end
    of a trained job."""
    try:
        return _gather_and_save(comm)
    except OSError as error:
        log.warning(str(error))
        return None


def _gather_and_save(comm: Any) -> str | None:
    """Gathers every rank's new spans into the file (rank 0 writes it).
    Returns its path on rank 0 when written, else None.

    Raises:
        OSError: rank 0 could not write the file (the message names it).
    """
    w = world.get()
    setting = config.SETTINGS.timeline
    origin, events = timeline.take_events()
    if not setting:
        events = []
    comm = w.control_comm if comm is None else comm
    if comm is None or w.size == 1:
        if not setting:
            return None
        _add(0, 0.0, events)
        return _save(path_for(setting))
    settings = collectives.allgather_object(setting, comm)
    if not any(settings):
        return None
    offsets = clocks.offsets(comm)
    parts = collectives.gather_object((origin, [_compact(e) for e in events]), comm)
    if offsets is None:
        return None
    origin0 = parts[0][0]
    for rank, (origin_r, events_r) in enumerate(parts):
        if settings[rank]:
            # This rank's ts -> rank 0's perf_counter -> after rank 0's origin.
            _add(rank, (origin_r - offsets[rank] - origin0) * 1e6, events_r)
    return _save(path_for(settings[0] or next(s for s in settings if s)))


def _compact(event: dict) -> tuple:
    """An event as it travels: (name, ts, dur, thread name[, args])."""
    compact = (event["name"], event["ts"], event["dur"], str(event["tid"]))
    return (*compact, event["args"]) if event.get("args") else compact


def _add(rank: int, shift_us: float, events: list) -> None:
    _RANKS.add(rank)
    for event in events:
        name, ts, dur, thread, *args = event if isinstance(event, tuple) else _compact(event)
        tid = _THREADS.setdefault((rank, thread), len(_THREADS) + 1)
        out = {"name": name, "ph": "X", "ts": ts + shift_us, "dur": dur, "pid": rank, "tid": tid}
        if args:
            out["args"] = args[0]  # e.g. a gradient bucket's number
        _EVENTS.append(out)


def _metadata() -> list[dict]:
    """Process and thread names, so the viewer shows "rank r" and its threads."""
    out: list[dict] = []
    for rank in sorted(_RANKS):
        for name, args in (
            ("process_name", {"name": f"rank {rank}"}),
            ("process_sort_index", {"sort_index": rank}),
        ):
            out.append({"name": name, "ph": "M", "ts": 0, "pid": rank, "tid": 0, "args": args})
    for (rank, thread), tid in sorted(_THREADS.items(), key=lambda item: item[1]):
        out.append(
            {
                "name": "thread_name",
                "ph": "M",
                "ts": 0,
                "pid": rank,
                "tid": tid,
                "args": {"name": thread},
            }
        )
    return out


def _save(path: str) -> str:
    """The whole file, replaced in one rename."""
    _EVENTS.sort(key=lambda e: e["ts"])
    trace = {
        "traceEvents": _metadata() + _EVENTS,
        "displayTimeUnit": "ms",
        "otherData": {"clock": "rank 0's perf_counter, microseconds", "ranks": len(_RANKS)},
    }
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        files.write_atomically(path, json.dumps(trace).encode())
    except OSError as error:
        raise OSError(f"cannot write the timeline (TD_TIMELINE) to {path}: {error}") from error
    _WRITTEN.append(path)
    return path

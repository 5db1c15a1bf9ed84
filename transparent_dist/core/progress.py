"""How far this rank has got: the phase it is in and the collectives it has entered.

```python
from transparent_dist.core import progress
progress.enter_phase("fit", 1, "fit #1 at train.py:40")   # by `phases`
progress.arrive("gradient exchange")                       # by `collectives`
print(progress.current())                                  # "fit #1 at train.py:40"
```

`phases` writes the phase, `collectives` notes each collective as it enters
it, and the stall watchdog (`stall`) reads both: it registers the one
`sink` that arrivals go to when it starts (none in a world of size 1, so an
arrival costs one test). The tables both sides share (the phase kinds and
the collective labels, by the small codes a watchdog message carries) live
here so that neither side imports the other.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = [
    "CODES",
    "KINDS",
    "LABELS",
    "add_counter",
    "arrive",
    "counters",
    "current",
    "enter_phase",
    "phase",
    "reset",
    "set_sink",
]

# Phase kinds, by the code a watchdog message carries for them.
KINDS = ("start", "fit", "evaluate", "predict", "script end")
# What a collective is, by the code a watchdog message carries for it.
LABELS = (
    "a collective",
    "gradient exchange",
    "metric reduction",
    "broadcast",
    "agreement check",
    "gather",
    "phase check",
)
CODES = {label: code for code, label in enumerate(LABELS)}

_START = "the start of the script"
# (kind code, count) of the phase this rank is in, and its description.
_PHASE = [0, 0]
_STATE: dict[str, str] = {"description": _START}
# Counts of collectives entered where `arrive` cannot be called (inside the
# native op), with their label code; the watchdog polls them.
_COUNTERS: list[tuple[Callable[[], int], int]] = []
_SINK: list[Callable[[int], None]] = []


def enter_phase(kind: str, index: int, description: str) -> None:
    """Notes that this rank is in phase `kind` #`index` (`description` is
    how messages name it, e.g. "fit #2 at train.py:40")."""
    _PHASE[:] = [KINDS.index(kind), index]
    _STATE["description"] = description


def phase() -> tuple[int, int]:
    """(kind code, index) of the phase this rank is in; index 0: none yet."""
    return _PHASE[0], _PHASE[1]


def current() -> str:
    """What this rank is doing, for messages: e.g. "fit #2 at train.py:40"."""
    return _STATE["description"]


def arrive(label: str) -> None:
    """Notes that this rank enters its next collective (`label` says which,
    one of `LABELS`)."""
    if _SINK:
        _SINK[0](CODES.get(label, 0))


def set_sink(sink: Callable[[int], None] | None) -> None:
    """Sends arrivals (their label codes) to `sink` from now on; None: to
    nobody."""
    _SINK[:] = [] if sink is None else [sink]


def add_counter(counter: Callable[[], int], label: str) -> None:
    """Counts `counter()` (a monotonic count of collectives, labelled
    `label`) among this rank's arrivals."""
    _COUNTERS.append((counter, CODES.get(label, 0)))


def counters() -> list[tuple[Callable[[], int], int]]:
    """The counters `add_counter` registered, with their label codes."""
    return list(_COUNTERS)


def reset() -> None:
    """Back to the start of the script: no phase, no counters, no sink
    (`activation.reset`)."""
    _PHASE[:] = [0, 0]
    _STATE["description"] = _START
    _COUNTERS.clear()
    _SINK.clear()

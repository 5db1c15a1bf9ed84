"""The end-of-script summary of training loops outside `fit` (GradientTape
loops, TF1 session loops), and the timeline's last write.

```python
from transparent_dist.core import loop_summary
loop_summary.step_ended("custom training loop", batch=64)   # after each step
# at the end of the script, from rank 0, once every rank got there:
# transparent_dist: custom training loop: 300 steps; 5,120 samples/s on 2 ranks
#   (steps 2-300, 25.0 ms/step); gradient exchange 3.1% of the time (0.78 ms/step,
#   0.0 MB/step), waiting for other ranks 1.2%
```

Such a loop has no end the plugin can see, so its summary comes at the end
of the script: `at_script_end` is called by `phases`' end-of-script
check once every rank has passed it (every rank is alive, at its end, and
MPI is not finalized), so the one gather it makes cannot hang on a rank
that left or pair with another collective. Timed from the end of the first
step to the end of the last (the first step traces the function and may
build the op); samples per second where each step's batch size is known
(the leading dimension shared by a step function's arguments, or by a
session's feeds), steps per second otherwise. Only with more than one rank.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from typing import Any

from transparent_dist.core import collectives, log, timeline, timeline_file, world

__all__ = ["at_script_end", "batch_size", "reset", "step_ended"]


@dataclasses.dataclass
class _Tally:
    """One kind of loop on this rank: steps, and the counters and clock at
    the end of its first and its last step."""

    steps: int = 0
    first_steps: int = 0
    samples: float = 0.0
    batch_known: bool = True
    first: tuple[float, timeline.Stats] | None = None
    last: tuple[float, timeline.Stats] | None = None

    def figures(self) -> dict[str, float]:
        """What rank 0 needs from this rank (plain numbers, to gather)."""
        start, begun = self.first
        end, ended = self.last
        return {
            "steps": self.steps,
            "first_steps": self.first_steps,
            "timed_steps": self.steps - self.first_steps,
            "seconds": end - start,
            "samples": self.samples if self.batch_known else -1.0,
            "exchange": ended.exchange_seconds - begun.exchange_seconds,
            "bytes": ended.exchange_bytes - begun.exchange_bytes,
            "wait": ended.wait_seconds - begun.wait_seconds,
        }


_TALLIES: dict[str, _Tally] = {}


def reset() -> None:
    """Forgets the loops' steps so far (`activation.reset`)."""
    _TALLIES.clear()


def step_ended(
    kind: str, updates: int = 1, batch: int | None = None, started: float | None = None
) -> None:
    """Notes the end of one step (of `updates` optimizer updates) of a loop
    of `kind`, each update on `batch` samples of this rank (None: unknown);
    with `started` (perf_counter seconds), a `step` span in the timeline."""
    tally = _TALLIES.setdefault(kind, _Tally())
    mark = (time.perf_counter(), timeline.totals())
    if started is not None:
        timeline.add("step", started, mark[0])
    tally.steps += updates
    if tally.first is None:
        tally.first, tally.first_steps = mark, tally.steps
    else:
        if batch is None:
            tally.batch_known = False
        else:
            tally.samples += batch * updates
    tally.last = mark


def batch_size(values: Iterable[Any]) -> int | None:
    """The leading dimension all of `values` with one (arrays, tensors of
    rank >= 1) share, or None when none has one or they differ."""
    dims = set()
    for value in values:
        shape = getattr(value, "shape", None)
        if shape is None or len(shape) == 0:
            continue
        dims.add(shape[0])
    if len(dims) != 1:
        return None
    (dim,) = dims
    return dim if isinstance(dim, int) and dim > 0 else None


def at_script_end(comm: Any) -> None:
    """Every rank, once every rank has reached the end of the script: the
    loops' summaries from rank 0 and the timeline's last write (both
    collective on `comm`). A failure here ends the job (`failures`) rather
    than leave the other ranks waiting in a gather."""
    try:
        _summarize(comm)
    except Exception as error:  # noqa: BLE001 - any failure, reported and fatal
        from transparent_dist.core import failures

        failures.handle(type(error), error, error.__traceback__)


def _summarize(comm: Any) -> None:
    w = world.get()
    local = {kind: tally.figures() for kind, tally in _TALLIES.items() if tally.first is not None}
    gathered = collectives.gather_object(local, comm)
    said = timeline_file.written()  # a fit's summary line gave the path
    path = timeline_file.write(comm)
    if not w.is_root:
        return
    lines = [_line(kind, [g.get(kind) for g in gathered], w.size) for kind in local]
    if path and not said:
        if lines:
            lines[-1] += f"; timeline in {path}"
        else:
            lines.append(f"timeline (every rank, one clock) in {path}")
    for line in lines:
        log.info(line, once=False)


def _line(kind: str, ranks: list[dict | None], size: int) -> str:
    """One summary line from every rank's figures (None: a rank that ran
    no such loop)."""
    figures = [f for f in ranks if f is not None]
    mine = ranks[0]
    steps, timed = int(mine["steps"]), int(mine["timed_steps"])
    first = int(mine["first_steps"]) + 1
    text = f"{kind}: {steps:,} step{'s' if steps != 1 else ''}"
    seconds = max(f["seconds"] for f in figures)
    if timed < 1 or seconds <= 0:
        return text + f" on {size} ranks (too few to time)"
    if all(f["samples"] >= 0 for f in figures):
        rate = f"{sum(f['samples'] for f in figures) / seconds:,.0f} samples/s"
    else:
        rate = f"{timed / seconds:,.1f} steps/s"
    exchange = sum(f["exchange"] for f in figures) / len(figures)
    wait = sum(f["wait"] for f in figures) / len(figures)
    moved = sum(f["bytes"] for f in figures) / len(figures)
    return (
        f"{text}; {rate} on {size} ranks (steps {first}-{steps}, {1e3 * seconds / timed:.1f} "
        f"ms/step); gradient exchange {exchange / seconds:.1%} of the time "
        f"({1e3 * exchange / timed:.2f} ms/step, {moved / timed / 1e6:.1f} MB/step), "
        f"waiting for other ranks {wait / seconds:.1%}"
    )

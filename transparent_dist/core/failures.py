"""A rank that fails ends the whole job, promptly and saying why.

```python
from transparent_dist.core import failures
failures.install()   # done by `import transparent_dist` in a job of size > 1
```

Without this, an uncaught exception on one rank leaves the others waiting
in the next collective until the walltime. The hook prints the traceback
with the failing rank, then calls MPI_Abort, which makes the launcher end
every rank with a non-zero status.
"""

from __future__ import annotations

import sys
import time
import traceback
from types import TracebackType

from transparent_dist.core import collectives, config, world
from transparent_dist.core.errors import CollectiveError

__all__ = ["INTERRUPTED_STATUS", "handle", "install", "uninstall"]

_PREVIOUS = None
# A job ended by SIGINT exits as a shell reports a process killed by it.
INTERRUPTED_STATUS = 130


def _is_collective(error: BaseException) -> bool:
    return isinstance(error, CollectiveError) or getattr(error, "td_collective", False)


def _hook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
    w = world.get()
    if w.size == 1:
        (_PREVIOUS or sys.__excepthook__)(kind, error, tb)
        return
    if issubclass(kind, KeyboardInterrupt):
        # Ctrl-C, or a SIGINT sent to this rank alone: the other ranks would
        # wait for it in their next collective, so the whole job ends.
        sys.stderr.write(
            f"transparent_dist: rank {w.rank} of {w.size} was interrupted (SIGINT, "
            "KeyboardInterrupt); ending all ranks of the job\n"
        )
        world.abort(INTERRUPTED_STATUS)
        return
    if world.survives_lost_ranks() and collectives.is_process_failure(error):
        _lost_rank(w)
        return
    if not w.is_root and _is_collective(error):
        # Rank 0 has the same error and reports it; an abort from here now
        # could kill it before it has printed. It aborts the job; this is
        # the fallback should it not.
        time.sleep(10)
    else:
        text = "".join(traceback.format_exception(kind, error, tb))
        lines = "".join(f"[rank {w.rank}] {line}\n" for line in text.rstrip("\n").split("\n"))
        sys.stderr.write(lines)
        sys.stderr.write(
            f"transparent_dist: rank {w.rank} of {w.size} failed with "
            f"{kind.__name__}; ending all ranks of the job\n"
        )
    world.abort(1)


def _lost_rank(w: world.World) -> None:
    """A rank was lost under ULFM and the job does not go on (TD_ELASTIC=off,
    or outside fit): MPI_Abort with a dead rank may hang there, so every
    communicator is revoked (which wakes every survivor into this same
    path) and this rank exits; the launcher then ends the job."""
    from transparent_dist.core import elastic  # its checkpoint lookup, only here

    for comm in w.comms.held():
        collectives.revoke(comm)
    # A survivor woken by another's revoke may not know yet which rank
    # failed (seen once: "rank(s) ?"): its MPI learns it within moments.
    lost = collectives.failed_ranks(w.comm)
    deadline = time.monotonic() + 2.0
    while not lost and time.monotonic() < deadline:
        time.sleep(0.05)
        lost = collectives.failed_ranks(w.comm)
    alive = [r for r in range(w.size) if r not in lost]
    message = ""
    if alive and w.rank == alive[0]:
        which = ", ".join(map(str, lost)) or "?"
        why = (
            "TD_ELASTIC=off"
            if config.SETTINGS.elastic == "off"
            else "outside a Keras fit, as in evaluate, predict, a custom loop or a TF1 "
            "session, the survivors do not go on"
        )
        message = (
            f"rank(s) {which} of {w.size} were lost; ending the job ({why}); "
            + elastic.where_to_resume()
        )
    elastic.leave(message)


def install() -> None:
    """Makes an uncaught exception on any rank end the whole job."""
    global _PREVIOUS
    if sys.excepthook is not _hook:
        _PREVIOUS = sys.excepthook
        sys.excepthook = _hook


def uninstall() -> None:
    global _PREVIOUS
    if sys.excepthook is _hook:
        sys.excepthook = _PREVIOUS or sys.__excepthook__
        _PREVIOUS = None


def handle(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
    """Reports an exception as the hook would (for the command-line runner)."""
    _hook(kind, error, tb)

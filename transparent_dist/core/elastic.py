"""Going on with fewer ranks when one is lost, under an MPI with ULFM.

```python
from transparent_dist.core import elastic
try:
    train_step()
except Exception as error:
    loss = elastic.recover(error)   # re-raises `error` unless the job can go on
    print(loss.lost, loss.size)     # the lost ranks (old numbers); the ranks left
```

Under Open MPI 5 started with `mpiexec --with-ft ulfm` (User Level Failure
Mitigation), a rank that dies does not end the job: an MPI call that needs
it returns `MPI_ERR_PROC_FAILED`, and calls on a communicator another rank
has revoked return `MPI_ERR_REVOKED`. `recover` turns such an error, on
every survivor, into a world of the survivors: it revokes every
communicator the plugin holds (so a survivor blocked in another collective
is woken with `MPI_ERR_REVOKED` and comes here too), shrinks the training
communicator (`MPI_Comm_shrink`: every survivor gets the same group, so
the lost set is agreed, never guessed), and makes that the world
(`world.rebuild`: new duplicates for training, data, control and the
watchdog). Holders of a communicator registered with `on_rebuild` (the
native op) are handed the new one; the stall watchdog starts again.

Without ULFM (MPICH, or Open MPI without `--with-ft ulfm`) the launcher
ends the job when a rank dies, as it always did; fewer survivors than
`TD_MIN_RANKS` end it here, naming the lost ranks and the checkpoint to
resume from (`TD_ELASTIC=off`: `core.failures`).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from typing import Any

from transparent_dist.core import checkpoint, collectives, config, listener, output, stall, world

__all__ = ["Loss", "available", "leave", "on_rebuild", "recover", "reset", "where_to_resume"]

# Holders of a communicator, told the new training one after a shrink.
_REBUILT: list[Callable[[Any], None]] = []


@dataclasses.dataclass(frozen=True)
class Loss:
    """What a recovery found: the `lost` ranks (their numbers in the world
    before), on which `hosts`; the world's size before and after; this
    rank's number before and after; the seconds it took."""

    lost: tuple[int, ...]
    hosts: tuple[str, ...]
    size_before: int
    size: int
    rank_before: int
    rank: int
    seconds: float

    def where(self) -> str:
        """`rank 2 (on node1)` / `ranks 1, 2 (on node1, node2)`."""
        ranks = ", ".join(str(r) for r in self.lost)
        hosts = ", ".join(dict.fromkeys(h for h in self.hosts if h))
        noun = "rank" if len(self.lost) == 1 else "ranks"
        return f"{noun} {ranks}" + (f" (on {hosts})" if hosts else "")


def reset() -> None:
    """Forgets the registered holders (`activation.reset`)."""
    _REBUILT.clear()


def on_rebuild(callback: Callable[[Any], None]) -> None:
    """Calls `callback(training communicator)` after every recovery (once,
    however often registered)."""
    if callback not in _REBUILT:
        _REBUILT.append(callback)


def available() -> bool:
    """Whether a lost rank may be survived here: `TD_ELASTIC` is not off,
    the job has several ranks, and its MPI has ULFM."""
    return (
        config.SETTINGS.elastic != "off" and world.get().distributed and world.survives_lost_ranks()
    )


def where_to_resume() -> str:
    """How the job can be run again: from the newest checkpoint in
    `TD_CHECKPOINT_DIR` (named), or afresh when there is none."""
    directory = config.SETTINGS.checkpoint_dir
    meta = checkpoint.peek(directory) if directory else None
    if meta is not None:
        return f"the same command resumes from the checkpoint {meta['path']}"
    if directory:
        return f"no checkpoint in {directory} yet: the same command starts afresh"
    return "no checkpoint (TD_CHECKPOINT_DIR is not set): the same command starts afresh"


def leave(message: str) -> None:
    """Ends this survivor's part in the job: `message` on standard error
    if given, then exit status 1, without MPI_Abort (which may wait forever
    for a lost rank under ULFM) nor MPI_Finalize; the launcher ends the job
    once every survivor has left. The script's open files are flushed."""
    if message:
        sys.stderr.write(f"transparent_dist: {message}\n")
    world.finalize_is_unsafe()
    world.note_exit_status(1)
    world.exit_if_finalize_is_unsafe()


def recover(error: BaseException) -> Loss:
    """The world of the survivors, after `error` said a rank was lost (see
    the module's docstring). Raises `error` again when it is not a lost rank
    or the job cannot go on without it; ends the job (naming the lost ranks)
    when too few are left. Collective over the survivors."""
    if not (available() and collectives.is_process_failure(error)):
        raise error
    started = time.perf_counter()
    before = world.get()
    for comm in before.comms.held():
        collectives.revoke(comm)
    # The watchdog's threads poll the revoked communicator: stopped before
    # it is dropped, started again over the new one.
    stall.stop()
    shrunk = collectives.shrink(before.comm)
    lost = tuple(collectives.missing_ranks(before.comm, shrunk))
    hosts = stall.hosts() or [""] * before.size
    world.rebuild(shrunk)
    world.finalize_is_unsafe()
    collectives.free(shrunk)
    # The old communicators are revoked: dropped, never freed (freeing is
    # collective over ranks of which some are gone).
    after = world.get()
    loss = Loss(
        lost=lost,
        hosts=tuple(hosts[r] for r in lost),
        size_before=before.size,
        size=after.size,
        rank_before=before.rank,
        rank=after.rank,
        seconds=0.0,
    )
    if after.size < max(1, config.SETTINGS.min_ranks):
        # Every survivor is here (the shrink is collective): rank 0 says it.
        leave(
            f"lost {loss.where()}; {after.size} of {before.size} rank(s) are left, fewer "
            f"than TD_MIN_RANKS={config.SETTINGS.min_ranks}: ending the job; " + where_to_resume()
            if after.is_root
            else ""
        )
    if after.is_root and not before.is_root:
        # Rank 0 was lost: this rank prints and writes for the job now.
        output.restore()
    for callback in _REBUILT:
        callback(after.comm)
    if after.distributed:
        stall.start()
    listener.start()
    return dataclasses.replace(loss, seconds=time.perf_counter() - started)

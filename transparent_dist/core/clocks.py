"""Each rank's monotonic clock (`time.perf_counter`) against rank 0's, so
that one timeline can hold every rank's spans on one clock.

```python
from transparent_dist.core import clocks, world
offsets = clocks.offsets(world.get().control_comm)   # every rank calls it
# rank 0: offsets[r] = rank r's perf_counter() - rank 0's, at the same instant
```

Ranks on rank 0's host read the same system-wide monotonic clock as rank 0
(Linux's CLOCK_MONOTONIC), so their offset is exactly 0. A rank on another
host answers a few ping-pongs from rank 0; its offset is the middle of the
round trip with the shortest time (accurate to half of it: microseconds over
an interconnect). Wall clocks (`time.time()`) are not used: they are only
as close between hosts as NTP keeps them (often milliseconds, worse on a
cluster without a good time service), and they jump when NTP steps them.
Collective: every rank of `comm` calls it at the same point.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import numpy as np

from transparent_dist.core import collectives

__all__ = ["offsets"]

_TAG = 7311
_ROUNDS = 5
# False measures every rank, rank 0's host included (tests: one host).
SAME_HOST_IS_SAME_CLOCK = True


def offsets(comm: Any) -> list[float] | None:
    """On rank 0, each rank's clock minus rank 0's, in seconds (0 for rank 0
    and ranks on its host); None on the other ranks."""
    # Rank 0's flag decides for all: every rank must agree who answers.
    seen = collectives.allgather_object((socket.gethostname(), SAME_HOST_IS_SAME_CLOCK), comm)
    rank = collectives.rank_of(comm)
    (host0, shortcut), hosts = seen[0], [host for host, _ in seen]
    remote = [r for r, host in enumerate(hosts) if r and (host != host0 or not shortcut)]
    if rank == 0:
        result = [0.0] * len(hosts)
        for r in remote:
            result[r] = _measure(comm, r)
        return result
    if rank in remote:
        _answer(comm)
    return None


def _measure(comm: Any, peer: int) -> float:
    """Rank 0's side: `peer`'s clock minus ours, from the shortest of
    `_ROUNDS` round trips."""
    ping = np.zeros(1)
    answer = np.zeros(1)
    best = (float("inf"), 0.0)
    for _ in range(_ROUNDS):
        sent = time.perf_counter()
        collectives.send(ping, peer, _TAG, comm)
        collectives.recv(answer, peer, _TAG, comm)
        received = time.perf_counter()
        trip = received - sent
        if trip < best[0]:
            best = (trip, float(answer[0]) - (sent + received) / 2)
    return best[1]


def _answer(comm: Any) -> None:
    """A remote rank's side: its clock's reading, once per ping."""
    ping = np.zeros(1)
    for _ in range(_ROUNDS):
        collectives.recv(ping, 0, _TAG, comm)
        collectives.send(np.array([time.perf_counter()]), 0, _TAG, comm)

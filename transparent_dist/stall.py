"""Stalled collectives: named after `TD_STALL_WARN` seconds, optionally
ended after `TD_STALL_ABORT`.

```python
from transparent_dist import stall
stall.arrive("gradient exchange")   # called by `collectives` on every rank
```

Every rank counts the collectives it enters (they are the same sequence on
every rank) and tells rank 0 with a 16-byte non-blocking send on a
communicator of its own. A watchdog thread on rank 0 notes when the first
rank reached collective k; if some ranks are still short of k after
`TD_STALL_WARN` seconds it prints which, and after `TD_STALL_ABORT` seconds
(off by default) it ends the job. This costs one tiny message per
collective and nothing else on the hot path. Collectives entered by the
native op (which cannot call Python) are counted there and polled.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
from typing import Any

import numpy as np

from transparent_dist import config, world

_TAG = 7301
_POLL_SECONDS = 0.2


class _Reporter:
    """Sends this rank's arrivals to rank 0."""

    def __init__(self, comm: Any) -> None:
        self.comm = comm
        self.count = 0
        self.sent = 0
        self.pending: collections.deque = collections.deque()
        self.lock = threading.Lock()

    def _total(self) -> int:
        return self.count + sum(counter() for counter, _ in _COUNTERS)

    def _send(self, total: int, label_code: int) -> None:
        from mpi4py import MPI

        self.sent = total
        message = np.array([total, label_code], np.int64)
        self.pending.append((self.comm.Isend([message, MPI.INT64_T], dest=0, tag=_TAG), message))
        while self.pending and self.pending[0][0].Test():
            self.pending.popleft()

    def arrive(self, label_code: int) -> None:
        with self.lock:
            self.count += 1
            self._send(self._total(), label_code)

    def poll(self) -> None:
        """Reports collectives entered outside Python (the native op)."""
        with self.lock:
            total = self._total()
            if total != self.sent:
                self._send(total, _COUNTERS[-1][1])


def _poll_forever(reporter: _Reporter) -> None:
    while True:
        time.sleep(_POLL_SECONDS)
        reporter.poll()


class _Watchdog(threading.Thread):
    """Rank 0's view of how far every rank has got."""

    def __init__(self, comm: Any, size: int, warn: float, abort: float) -> None:
        super().__init__(name="transparent_dist-stall-watchdog", daemon=True)
        self.comm, self.size, self.warn, self.abort_after = comm, size, warn, abort
        self.reached = [0] * size
        self.labels: dict[int, int] = {}
        self.first_seen: dict[int, float] = {}
        self.warned: set[int] = set()

    def run(self) -> None:
        from mpi4py import MPI

        message = np.zeros(2, np.int64)
        status = MPI.Status()
        while True:
            while self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=_TAG, status=status):
                self.comm.Recv([message, MPI.INT64_T], source=status.Get_source(), tag=_TAG)
                self._note(status.Get_source(), int(message[0]), int(message[1]))
            self._check(time.monotonic())
            time.sleep(_POLL_SECONDS)

    def _note(self, rank: int, count: int, label: int) -> None:
        self.reached[rank] = max(self.reached[rank], count)
        if count not in self.first_seen:
            self.first_seen[count] = time.monotonic()
            self.labels[count] = label
            for old in [k for k in self.first_seen if k < count - 2]:
                self.first_seen.pop(old, None)
                self.labels.pop(old, None)

    def _check(self, now: float) -> None:
        front = max(self.reached)
        waiting_since = self.first_seen.get(front)
        if waiting_since is None:
            return
        behind = [r for r, k in enumerate(self.reached) if k < front]
        if not behind:
            return
        waited = now - waiting_since
        label = _LABELS[self.labels.get(front, 0)]
        if waited >= self.warn and front not in self.warned:
            self.warned.add(front)
            ahead = self.size - len(behind)
            sys.stderr.write(
                f"transparent_dist: WARNING: stalled collective: {ahead} of {self.size} "
                f"ranks have waited {waited:.0f} s in collective #{front} ({label}) for "
                f"rank(s) {_ranks(behind)}, which have not arrived\n"
            )
            sys.stderr.flush()
        if self.abort_after and waited >= self.abort_after:
            sys.stderr.write(
                f"transparent_dist: rank(s) {_ranks(behind)} did not reach collective "
                f"#{front} ({label}) within TD_STALL_ABORT={self.abort_after:g} s; ending the job\n"
            )
            world.abort(1)


def _ranks(ranks: list[int]) -> str:
    shown = ", ".join(str(r) for r in ranks[:16])
    return shown + (f" and {len(ranks) - 16} more" if len(ranks) > 16 else "")


_LABELS = [
    "a collective",
    "gradient exchange",
    "metric reduction",
    "broadcast",
    "agreement check",
    "gather",
]
_CODES = {label: code for code, label in enumerate(_LABELS)}
_REPORTER: _Reporter | None = None
# Counts of collectives entered where `arrive` cannot be called (inside the
# native op), with their label code; polled every _POLL_SECONDS.
_COUNTERS: list[tuple[Any, int]] = []


def start() -> None:
    """Starts the monitor (on every rank of a job of size > 1); idempotent."""
    global _REPORTER
    w = world.get()
    if _REPORTER is not None or w.size == 1 or config.SETTINGS.stall_warn <= 0:
        return
    from mpi4py import MPI

    comm = MPI.COMM_WORLD.Dup()
    if w.is_root:
        _Watchdog(comm, w.size, config.SETTINGS.stall_warn, config.SETTINGS.stall_abort).start()
    _REPORTER = _Reporter(comm)
    if _COUNTERS:
        _start_polling()


def _start_polling() -> None:
    threading.Thread(
        target=_poll_forever, args=(_REPORTER,), name="transparent_dist-stall-poll", daemon=True
    ).start()


def add_counter(counter: Any, label: str) -> None:
    """Counts `counter()` (a monotonic count of collectives, labelled
    `label`) among this rank's arrivals."""
    _COUNTERS.append((counter, _CODES.get(label, 0)))
    if _REPORTER is not None and len(_COUNTERS) == 1:
        _start_polling()


def arrive(label: str) -> None:
    """Notes that this rank enters its next collective (`label` says which)."""
    if _REPORTER is not None:
        _REPORTER.arrive(_CODES.get(label, 0))

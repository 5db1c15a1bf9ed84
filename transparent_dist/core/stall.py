"""Stalled collectives: the late ranks named after `TD_STALL_WARN` seconds
(with the Python stacks of the late and the waiting ranks), the job ended
after `TD_STALL_ABORT` seconds (600 by default; 0: never).

```python
from transparent_dist.core import stall
stall.start()    # at activation, on every rank of a job of size > 1
```

Every rank counts the collectives it enters (the same sequence on every
rank: `collectives` notes each in `progress`, whose sink this module
registers) and tells two watcher ranks, 0 and the last, with a 32-byte
non-blocking send on a communicator of its own (`Communicators.watchdog`):
the count, what the collective is, and the phase (`phases`) the rank is in. Each watcher notes
when the first rank reached collective k. If some ranks are still short of
k after `TD_STALL_WARN` seconds, one watcher names them: rank 0, unless rank
0 is among the late (stopped, or busy), when the last rank does, so the
watchdog survives any one rank. It then asks the late ranks and (up to 8)
waiting ranks for the stack of their main thread, which the listener thread
(`listener`) on every rank prints; a rank that prints none is stopped or holds the
interpreter lock. After `TD_STALL_ABORT` seconds it ends the job.
Collectives entered by the native op (which cannot call Python) are counted
there and polled by the listener thread. This costs two tiny messages per
collective and nothing else on the hot path. The watchdog's own messages
are point-to-point on its own communicator, so they are never counted, and
never matched by a collective.
"""

from __future__ import annotations

import collections
import socket
import sys
import threading
import time
from typing import Any

import numpy as np

from transparent_dist.core import collectives, config, listener, progress, stacks, world

__all__ = ["hosts", "reset", "start", "stop", "watchers"]

_TAG = 7301
_DUMP_TAG = 7302
_POLL_SECONDS = 0.2
_MAX_STACKS = 8
# Ranks in the same collective number but different phases can never meet
# there; this long only lets a phase check that already sees the
# difference (and says it better) end the job first.
_MISMATCH_SECONDS = 3.0
# Set when the script is done with MPI (its end check passed, or it called
# MPI.Finalize): the watchdog threads stop polling before MPI goes away.
_STOP = threading.Event()
_THREADS: list[threading.Thread] = []


class _Reporter:
    """Sends this rank's arrivals to the watchers."""

    def __init__(self, comm: Any, watchers: list[int]) -> None:
        self.comm, self.watchers = comm, watchers
        self.count = 0
        # The native op's count so far: a reporter started again over a
        # shrunk world (`elastic`) counts from zero on every survivor.
        self.base = sum(counter() for counter, _ in progress.counters())
        self.sent = 0
        self.pending: collections.deque = collections.deque()
        self.lock = threading.Lock()

    def _total(self) -> int:
        return self.count + sum(counter() for counter, _ in progress.counters()) - self.base

    def _send(self, total: int, label_code: int) -> None:
        self.sent = total
        message = np.array([total, label_code, *progress.phase()], np.int64)
        for watcher in self.watchers:
            request = collectives.isend(message, watcher, _TAG, self.comm)
            self.pending.append((request, message))
        while self.pending and collectives.completed(self.pending[0][0]):
            self.pending.popleft()

    def arrive(self, label_code: int) -> None:
        with self.lock:
            self.count += 1
            self._send(self._total(), label_code)

    def poll(self) -> None:
        """Reports collectives entered outside Python (the native op); a
        listener poller."""
        with self.lock:
            total = self._total()
            if total != self.sent:
                self._send(total, progress.counters()[-1][1])

    def answer_stack_requests(self) -> None:
        """Prints the main thread's stack when a watcher asks; a listener
        poller."""
        rank = world.get().rank
        request = np.zeros(2, np.int64)
        while (source := collectives.probe(_DUMP_TAG, self.comm)) is not None:
            collectives.recv(request, source, _DUMP_TAG, self.comm)
            role = "late" if request[0] else "waiting"
            lines = stacks.main_thread_stack().rstrip("\n").split("\n")
            sys.stderr.write(
                f"transparent_dist: stack of rank {rank} ({role}; in {progress.current()}), "
                f"main thread, most recent call last:\n"
                + "".join(f"[rank {rank}] {line}\n" for line in lines)
            )
            sys.stderr.flush()


class _Watchdog(threading.Thread):
    """A watcher rank's view of how far every rank has got."""

    def __init__(
        self,
        comm: Any,
        rank: int,
        watchers: list[int],
        warn: float,
        abort: float,
        hosts: list[str] | None = None,
    ):
        super().__init__(name="transparent_dist-stall-watchdog", daemon=True)
        self.comm, self.rank, self.watchers = comm, rank, watchers
        self.hosts = hosts or []
        self.size = collectives.size_of(comm)
        self.warn, self.abort_after = warn, abort
        self.reached = [0] * self.size
        self.phase = [(0, 0)] * self.size
        self.labels: dict[int, int] = {}
        self.first_seen: dict[int, float] = {}
        self.warned: set[int] = set()
        self.mismatch: tuple[int, float] | None = None

    def run(self) -> None:
        try:
            self._watch()
        except Exception as error:
            # A lost rank: the main thread recovers (`elastic`) and starts
            # a watchdog again, or the launcher ends the job.
            if not collectives.is_process_failure(error):
                raise

    def _watch(self) -> None:
        message = np.zeros(4, np.int64)
        while not _STOP.is_set():
            while (source := collectives.probe(_TAG, self.comm)) is not None:
                collectives.recv(message, source, _TAG, self.comm)
                self._note(source, message)
            now = time.monotonic()
            self._check_phases(now)
            self._check(now)
            _STOP.wait(_POLL_SECONDS)

    def _note(self, rank: int, message: np.ndarray) -> None:
        count, label = int(message[0]), int(message[1])
        if count >= self.reached[rank]:
            self.reached[rank] = count
            self.phase[rank] = (int(message[2]), int(message[3]))
        if count not in self.first_seen:
            self.first_seen[count] = time.monotonic()
            self.labels[count] = label
            for old in [k for k in self.first_seen if k < count - 2]:
                self.first_seen.pop(old, None)
                self.labels.pop(old, None)

    def _reports(self, behind: list[int]) -> bool:
        """Whether this watcher speaks for a stall: rank 0 does, unless it
        is itself late; then the other watcher does."""
        speaker = self.watchers[-1] if 0 in behind else self.watchers[0]
        return self.rank == speaker

    def _phase(self, rank: int) -> str:
        kind, index = self.phase[rank]
        if index == 0:  # collectives before any fit: a custom loop, a TF1 session
            return "the script's own training loop (before any fit / evaluate / predict)"
        if progress.KINDS[kind] == "script end":
            return progress.KINDS[kind]
        return f"{progress.KINDS[kind]} #{index}"

    def _ask_for_stacks(self, behind: list[int]) -> None:
        waiting = [r for r in range(self.size) if r not in behind]
        chosen = behind[:_MAX_STACKS] + waiting[: max(0, _MAX_STACKS - len(behind))]
        for rank in chosen:
            message = np.array([1 if rank in behind else 0, 0], np.int64)
            collectives.send(message, rank, _DUMP_TAG, self.comm)

    def _check_phases(self, now: float) -> None:
        """Ends the job when ranks wait in the same collective number in
        different phases: their collectives can never match (one rank ended
        its script, or called evaluate, while another is in fit)."""
        front = max(self.reached)
        at_front = [r for r in range(self.size) if self.reached[r] == front]
        groups: dict[tuple[int, int], list[int]] = {}
        for r in at_front:
            groups.setdefault(self.phase[r], []).append(r)
        if len(groups) < 2:
            self.mismatch = None
            return
        if self.mismatch is None or self.mismatch[0] != front:
            self.mismatch = (front, now)
            return
        if now - self.mismatch[1] < _MISMATCH_SECONDS or not self._reports(at_front[1:]):
            return
        end = progress.KINDS.index("script end")
        ended = [r for key, ranks in groups.items() if key[0] == end for r in ranks]
        if ended:
            others = [r for r in at_front if r not in ended]
            reason = (
                f"rank(s) {_ranks(ended)} reached the end of the script (it returned, called "
                "sys.exit() with any status, ran off its end or called MPI.Finalize()) while "
                f"rank(s) {_ranks(others)} wait in collective #{front} of "
                f"{self._phase(others[0])}, which the ended rank(s) will never join: every "
                "rank must make the same calls, so no rank may leave before the others"
            )
        else:
            reason = "the ranks wait in the same collective but in different phases: " + "; ".join(
                f"rank(s) {_ranks(ranks)} in {self._phase(ranks[0])}" for ranks in groups.values()
            )
        sys.stderr.write(f"transparent_dist: {reason}; ending the job\n")
        world.abort(1)

    def _check(self, now: float) -> None:
        front = max(self.reached)
        waiting_since = self.first_seen.get(front)
        if waiting_since is None:
            return
        behind = [r for r, k in enumerate(self.reached) if k < front]
        if not behind or not self._reports(behind):
            return
        waited = now - waiting_since
        label = progress.LABELS[self.labels.get(front, 0)]
        where = "; ".join(
            f"rank {r} last entered collective #{self.reached[r]} in {self._phase(r)}"
            for r in behind[:4]
        )
        if waited >= self.warn and front not in self.warned:
            self.warned.add(front)
            ahead = self.size - len(behind)
            abort = (
                f"the job ends after TD_STALL_ABORT={self.abort_after:g} s"
                if self.abort_after
                else "TD_STALL_ABORT=0: the job waits"
            )
            sys.stderr.write(
                f"transparent_dist: WARNING: stalled collective: {ahead} of {self.size} "
                f"ranks have waited {waited:.0f} s in collective #{front} ({label}, "
                f"{self._phase(self.reached.index(front))}) for rank(s) {_ranks(behind)}"
                f"{_on_hosts(behind, self.hosts)}, "
                f"which have not arrived ({where}); {abort}. Stacks follow; a late rank "
                "that prints none is stopped, or blocked holding the interpreter lock\n"
            )
            sys.stderr.flush()
            self._ask_for_stacks(behind)
        if self.abort_after and waited >= self.abort_after:
            sys.stderr.write(
                f"transparent_dist: rank(s) {_ranks(behind)}{_on_hosts(behind, self.hosts)} "
                "did not reach collective "
                f"#{front} ({label}) within TD_STALL_ABORT={self.abort_after:g} s ({where}); "
                "ending the job\n"
            )
            world.abort(1)


def _ranks(ranks: list[int]) -> str:
    shown = ", ".join(str(r) for r in ranks[:16])
    return shown + (f" and {len(ranks) - 16} more" if len(ranks) > 16 else "")


def _on_hosts(ranks: list[int], hosts: list[str]) -> str:
    """The hosts of late `ranks` for a report, e.g. ` (on node1: all 2 of
    its ranks, a lost node or link?)`, given every rank's host; nothing
    when the job runs on one host."""
    if len(set(hosts)) < 2:
        return ""
    parts = []
    for host in dict.fromkeys(hosts[r] for r in ranks):
        late = sum(1 for r in ranks if hosts[r] == host)
        total = hosts.count(host)
        if late == total and total < len(hosts):
            parts.append(f"{host}: all {total} of its ranks, a lost node or link?")
        else:
            parts.append(f"{host}: {late} of {total} ranks")
    return " (on " + "; ".join(parts[:8]) + ")"


_REPORTER: _Reporter | None = None
# Every rank's host, gathered by `start` (for `elastic`'s report of a loss).
_HOSTS: list[str] = []


def hosts() -> list[str]:
    """Every rank's host, in rank order, since `start` (empty before)."""
    return list(_HOSTS)


def watchers(size: int) -> list[int]:
    """The ranks that watch for stalls: 0 and the last."""
    return sorted({0, size - 1})


def start() -> None:
    """Starts the monitor (on every rank of a job of size > 1); idempotent."""
    global _REPORTER
    w = world.get()
    if _REPORTER is not None or w.size == 1:
        return
    comm = w.comms.watchdog
    # TD_STALL_WARN=0: no watchdog, but the listener still serves `signals`.
    chosen = watchers(w.size) if config.SETTINGS.stall_warn > 0 else []
    # Every rank's host, so that a report can name a node whose ranks are
    # all late (before the sink is set: the watchdog never counts itself).
    hosts = collectives.allgather_object(socket.gethostname(), comm)
    _HOSTS[:] = hosts
    _STOP.clear()
    if w.rank in chosen:
        settings = config.SETTINGS
        _THREADS.append(
            _Watchdog(comm, w.rank, chosen, settings.stall_warn, settings.stall_abort, hosts)
        )
    _REPORTER = _Reporter(comm, chosen)
    for thread in _THREADS:
        thread.start()
    progress.set_sink(_REPORTER.arrive)
    listener.register(_REPORTER.poll)
    listener.register(_REPORTER.answer_stack_requests)
    listener.start()


def stop() -> None:
    """Stops counting, and stops the watchdog threads and waits for them
    (before MPI is finalized: a thread polling MPI after that crashes the
    process). The listener thread, which may be in one of this module's
    pollers, is stopped first by whoever ends MPI's use (`listener.stop`:
    the end-of-script check)."""
    global _REPORTER
    progress.set_sink(None)
    _STOP.set()
    for thread in _THREADS:
        if thread is not threading.current_thread():
            thread.join(timeout=5 * _POLL_SECONDS + 1)
    _THREADS.clear()
    if _REPORTER is not None:
        listener.unregister(_REPORTER.poll)
        listener.unregister(_REPORTER.answer_stack_requests)
    _REPORTER = None


def reset() -> None:
    """Stops the watchdog (`stop`; `activation.reset`); `start` begins
    again. The counters and the phase are `progress.reset`'s, the listener
    thread `listener.reset`'s. The watchdog's communicator belongs to the
    world (`Communicators.watchdog`)."""
    stop()
    _HOSTS.clear()

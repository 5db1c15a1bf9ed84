"""The stall watchdog, in-process: its counting and phase bookkeeping, the
messages naming late ranks, and its threads stopping, with a fake
communicator of three ranks (for the bookkeeping) or `MPI.COMM_SELF`
(for real messages and threads)."""

from __future__ import annotations

import threading
import time
import types

import numpy as np
import pytest

from transparent_dist.core import config, listener, progress, stall, world

FIT, EVALUATE, END = (progress.KINDS.index(k) for k in ("fit", "evaluate", "script end"))
EXCHANGE = progress.CODES["gradient exchange"]


class FakeComm:
    """A communicator of `size` ranks that records the point-to-point
    messages sent on it (the watchdog's stack requests)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.sent: list[tuple[int, list[int]]] = []

    def Get_size(self) -> int:  # noqa: N802 - MPI's name
        return self.size

    def Send(self, buf, dest, tag):  # noqa: N802
        array = buf[0] if isinstance(buf, list) else buf
        self.sent.append((dest, np.asarray(array).tolist()))

    def Isend(self, buf, dest, tag):  # noqa: N802
        self.Send(buf, dest, tag)
        return types.SimpleNamespace(Test=lambda: True)


@pytest.fixture(autouse=True)
def fresh():
    stall.reset()
    listener.reset()
    progress.reset()
    yield
    stall.reset()
    listener.reset()
    progress.reset()


@pytest.fixture
def aborts(monkeypatch):
    """world.abort, recorded instead of ending the test run."""
    codes: list[int] = []

    def abort(code: int = 1) -> None:
        codes.append(code)

    monkeypatch.setattr(world, "abort", abort)
    return codes


def _watchdog(size=3, rank=0, warn=10.0, abort=0.0, hosts=None):
    comm = FakeComm(size)
    return stall._Watchdog(comm, rank, stall.watchers(size), warn, abort, hosts), comm


def _arrive(dog, rank, count, kind=FIT, index=1, label=EXCHANGE):
    dog._note(rank, np.array([count, label, kind, index], np.int64))


# ---------------------------------------------------------------- counting


def test_watchers_are_rank_0_and_the_last():
    assert stall.watchers(1) == [0]
    assert stall.watchers(2) == [0, 1]
    assert stall.watchers(5) == [0, 4]


def test_note_keeps_the_furthest_count_and_its_phase():
    dog, _ = _watchdog()
    _arrive(dog, 1, 5, FIT, 2)
    _arrive(dog, 1, 3, EVALUATE, 1)  # a late message must not move it back
    assert dog.reached == [0, 5, 0]
    assert dog.phase[1] == (FIT, 2)
    assert dog.labels[5] == EXCHANGE and 5 in dog.first_seen


def test_note_forgets_collectives_long_passed():
    dog, _ = _watchdog()
    for count in range(1, 8):
        _arrive(dog, 0, count)
    assert sorted(dog.first_seen) == [5, 6, 7]
    assert sorted(dog.labels) == [5, 6, 7]


def test_rank_0_speaks_unless_it_is_late_then_the_last_rank_does():
    first, _ = _watchdog(rank=0)
    last, _ = _watchdog(rank=2)
    assert first._reports([1]) and not last._reports([1])
    assert last._reports([0, 1]) and not first._reports([0, 1])


def test_phase_names():
    dog, _ = _watchdog()
    dog.phase = [(0, 0), (FIT, 3), (END, 1)]
    assert dog._phase(0).startswith("the script's own training loop")
    assert dog._phase(1) == "fit #3"
    assert dog._phase(2) == "script end"


# ------------------------------------------------------------ late ranks


def test_no_report_before_the_warning_time_or_without_late_ranks(capsys, aborts):
    dog, comm = _watchdog(warn=10.0)
    for rank in range(3):
        _arrive(dog, rank, 4)
    dog._check(time.monotonic() + 100)  # everyone arrived
    _arrive(dog, 0, 5)
    dog._check(dog.first_seen[5] + 5)  # late, but not for long
    assert capsys.readouterr().err == "" and comm.sent == [] and aborts == []


def test_the_warning_names_the_late_rank_its_host_and_asks_for_stacks(capsys, aborts):
    dog, comm = _watchdog(warn=10.0, hosts=["n1", "n1", "n2"])
    for rank, count in ((0, 5), (1, 5), (2, 4)):
        _arrive(dog, rank, count)
    dog._check(dog.first_seen[5] + 12)
    err = capsys.readouterr().err
    assert "stalled collective: 2 of 3 ranks have waited 12 s in collective #5" in err
    assert "(gradient exchange, fit #1) for rank(s) 2 (on n2: all 1 of its ranks" in err
    assert "rank 2 last entered collective #4 in fit #1" in err
    assert "TD_STALL_ABORT=0: the job waits" in err
    # The late rank's stack first (flag 1), then the waiting ranks'.
    assert comm.sent == [(2, [1, 0]), (0, [0, 0]), (1, [0, 0])]
    assert aborts == []
    dog._check(dog.first_seen[5] + 20)  # said once per collective
    assert capsys.readouterr().err == "" and len(comm.sent) == 3


def test_rank_0_late_is_reported_by_the_last_rank_only(capsys, aborts):
    quiet, _ = _watchdog(rank=0, warn=1.0)
    speaker, _ = _watchdog(rank=2, warn=1.0)
    for dog in (quiet, speaker):
        _arrive(dog, 1, 9)
        _arrive(dog, 2, 9)
        _arrive(dog, 0, 8)
    quiet._check(quiet.first_seen[9] + 5)
    assert capsys.readouterr().err == ""
    speaker._check(speaker.first_seen[9] + 5)
    assert "for rank(s) 0, which have not arrived" in capsys.readouterr().err


def test_the_job_ends_after_the_abort_time(capsys, aborts):
    dog, _ = _watchdog(warn=1.0, abort=30.0)
    _arrive(dog, 0, 2)
    _arrive(dog, 1, 2)
    dog._check(dog.first_seen[2] + 5)
    assert aborts == []
    dog._check(dog.first_seen[2] + 31)
    assert aborts == [1]
    err = capsys.readouterr().err
    assert "rank(s) 2 did not reach collective #2 (gradient exchange)" in err
    assert "within TD_STALL_ABORT=30 s" in err


def test_many_late_ranks_are_shortened():
    assert stall._ranks(list(range(20))).endswith("15 and 4 more")
    assert stall._on_hosts([1], ["a", "a", "a"]) == ""
    assert stall._on_hosts([0, 2], ["a", "b", "b", "a"]) == " (on a: 1 of 2 ranks; b: 1 of 2 ranks)"


# ------------------------------------------------------------ phase checks


def test_ranks_in_one_collective_but_different_phases_end_the_job(capsys, aborts):
    dog, _ = _watchdog()
    _arrive(dog, 0, 7, FIT, 1)
    _arrive(dog, 1, 7, EVALUATE, 1)
    _arrive(dog, 2, 7, FIT, 1)
    start = time.monotonic()
    dog._check_phases(start)
    dog._check_phases(start + 1)  # a phase check may still say it better
    assert aborts == []
    dog._check_phases(start + stall._MISMATCH_SECONDS + 1)
    assert aborts == [1]
    err = capsys.readouterr().err
    assert "same collective but in different phases: rank(s) 0, 2 in fit #1; " in err
    assert "rank(s) 1 in evaluate #1" in err


def test_a_rank_at_the_script_end_is_named_as_leaving_early(capsys, aborts):
    dog, _ = _watchdog()
    _arrive(dog, 0, 7, FIT, 2)
    _arrive(dog, 1, 7, END, 1)
    _arrive(dog, 2, 7, FIT, 2)
    start = time.monotonic()
    dog._check_phases(start)
    dog._check_phases(start + stall._MISMATCH_SECONDS + 1)
    assert aborts == [1]
    err = capsys.readouterr().err
    assert "rank(s) 1 reached the end of the script" in err
    assert "while rank(s) 0, 2 wait in collective #7 of fit #2" in err


def test_a_mismatch_that_resolves_is_forgotten(aborts):
    dog, _ = _watchdog()
    _arrive(dog, 0, 7, FIT, 1)
    _arrive(dog, 1, 7, EVALUATE, 1)
    _arrive(dog, 2, 7, FIT, 1)
    start = time.monotonic()
    dog._check_phases(start)
    _arrive(dog, 1, 7, FIT, 1)  # its phase check moved it on
    dog._check_phases(start + stall._MISMATCH_SECONDS + 1)
    assert dog.mismatch is None and aborts == []


# ------------------------------------------------- real messages, threads


def test_the_reporter_tells_the_watchdog_its_count_and_phase_over_mpi():
    from mpi4py import MPI

    comm = MPI.COMM_SELF
    progress.enter_phase("evaluate", 2, "evaluate #2 at x.py:1")
    reporter = stall._Reporter(comm, [0])
    reporter.arrive(progress.CODES["broadcast"])
    reporter.arrive(EXCHANGE)
    dog = stall._Watchdog(comm, 0, [0], 10.0, 0.0)
    message = np.zeros(4, np.int64)
    from transparent_dist.core import collectives

    while (source := collectives.probe(stall._TAG, comm)) is not None:
        collectives.recv(message, source, stall._TAG, comm)
        dog._note(source, message)
    for request, _ in reporter.pending:
        request.Wait()
    assert dog.reached == [2] and dog.phase == [(EVALUATE, 2)]
    assert dog.labels == {1: progress.CODES["broadcast"], 2: EXCHANGE}


def test_the_reporter_adds_collectives_counted_outside_python():
    comm = FakeComm(1)
    native = {"count": 0}
    progress.add_counter(lambda: native["count"], "gradient exchange")
    reporter = stall._Reporter(comm, [0])
    reporter.poll()
    assert comm.sent == []  # nothing new
    native["count"] = 3
    reporter.poll()
    reporter.arrive(progress.CODES["gather"])
    assert [m[0] for _, m in comm.sent] == [3, 4]


def test_start_and_reset_leave_no_thread_running(monkeypatch):
    """`start` on a (pretend) rank of two, TD_STALL_WARN=0 (no watchdog
    thread, the listener only); `reset` stops and joins every thread, and
    arrivals go nowhere after it."""
    from mpi4py import MPI

    fake = world.World(rank=0, size=2, comms=world.Communicators(watchdog=MPI.COMM_SELF))
    monkeypatch.setattr(world, "get", lambda: fake)
    monkeypatch.setattr(config.SETTINGS, "stall_warn", 0.0)
    stall.start()
    assert listener.running()
    threads = [t for t in threading.enumerate() if t.name.startswith("transparent_dist")]
    assert threads
    stall.reset()
    listener.reset()
    assert not listener.running()
    assert all(not t.is_alive() for t in threads)
    progress.arrive("gradient exchange")  # no sink: nothing happens
    stall.start()  # and it starts again
    assert listener.running()


def test_reset_joins_a_watchdog_thread_on_comm_self():
    from mpi4py import MPI

    dog = stall._Watchdog(MPI.COMM_SELF, 0, [0], 10.0, 0.0)
    stall._STOP.clear()
    stall._THREADS.append(dog)
    dog.start()
    assert dog.is_alive()
    stall.reset()
    assert not dog.is_alive() and stall._THREADS == []

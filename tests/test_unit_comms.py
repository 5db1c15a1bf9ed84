"""One owner for the communicators, every MPI call through `collectives`,
in-process on `MPI.COMM_SELF`: each collective is counted for the
watchdog (`progress`), except on the data communicator and point to point;
`world.rebuild` swaps the communicators; the finalize callback comes off
without being called."""

from __future__ import annotations

import numpy as np
import pytest

from transparent_dist.core import collectives, progress, world
from transparent_dist.core.errors import CollectiveError


@pytest.fixture
def comms(monkeypatch):
    """A world of one rank with four real (duplicated) communicators, and
    the labels of the collectives counted meanwhile."""
    from mpi4py import MPI

    made = world.Communicators.duplicate(MPI.COMM_SELF)
    monkeypatch.setattr(world, "_WORLD", world.World(comms=made))
    counted: list[str] = []
    progress.set_sink(lambda code: counted.append(progress.LABELS[code]))
    yield made, counted
    progress.set_sink(None)
    made.free()


def test_every_collective_is_counted_with_its_label(comms):
    made, counted = comms
    comm = made.training
    assert collectives.allgather_object(3, comm) == [3]
    assert collectives.gather_object("a", comm) == ["a"]
    assert collectives.broadcast_object({"k": 1}, comm) == {"k": 1}
    collectives.barrier(comm)
    flags = np.array([1, -1], np.int32)
    collectives.allreduce_in_place(flags, comm, "max", "agreement check")
    records = collectives.allgather_records(np.array([7], np.int64), comm, "phase check")
    assert records.tolist() == [[7]]
    collectives.check_agreement("a value", 5, made.control)
    assert counted == [
        "gather",
        "gather",
        "broadcast",
        "a collective",
        "agreement check",
        "phase check",
        "agreement check",
    ]


def test_data_communicator_and_point_to_point_are_not_counted(comms):
    made, counted = comms
    assert collectives.allgather_object(1, made.data) == [1]
    collectives.allreduce_in_place(np.zeros(2, np.int32), made.data, "max")
    message = np.array([5], np.int64)
    request = collectives.isend(message, 0, 11, made.watchdog)
    assert collectives.probe(11, made.watchdog) == 0
    received = np.zeros(1, np.int64)
    collectives.recv(received, 0, 11, made.watchdog)
    assert collectives.completed(request) and received.tolist() == [5]
    assert collectives.probe(11, made.watchdog) is None
    assert counted == []


def test_no_communicator_means_this_rank_alone(comms):
    _, counted = comms
    assert collectives.allgather_object("x", None) == ["x"]
    assert collectives.gather_object("x", None) == ["x"]
    assert collectives.broadcast_object("x", None) == "x"
    collectives.barrier(None)
    assert counted == []


def test_together_gives_one_error_for_a_failure_in_the_block(comms):
    with pytest.raises(CollectiveError, match="reading f.csv: no such file"):
        with collectives.together("reading f.csv"):
            open("/nonexistent/f.csv")


def test_rebuild_replaces_the_communicators_and_hands_back_the_old(comms):
    from mpi4py import MPI

    made, _ = comms
    old = world.rebuild(MPI.COMM_SELF)
    try:
        assert old is made
        new = world.get()
        assert (new.rank, new.size, new.local_rank, new.local_size) == (0, 1, 0, 1)
        fresh = [new.comm, new.data_comm, new.control_comm, new.comms.watchdog]
        assert all(c is not None for c in fresh)
        assert all(c != m for c in fresh for m in (made.training, made.data, made.control))
        assert len(set(map(MPI._handleof, fresh))) == 4
    finally:
        world.get().comms.free()


def test_a_finalize_callback_comes_off_without_being_called(comms):
    called: list[int] = []
    world.at_finalize(lambda: called.append(1))
    assert world._FINALIZE["keyval"] is not None
    world.forget_finalize()
    assert world._FINALIZE["keyval"] is None and called == []
    assert not world.is_finalized()

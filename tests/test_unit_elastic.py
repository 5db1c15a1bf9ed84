"""A lost rank, in-process: which errors say a rank was lost, what is
survivable where, and the global batch the survivors keep. The job itself
(3 ranks, one killed, under Open MPI's ULFM) is in test_open_mpi.py."""

from __future__ import annotations

import pytest

from transparent_dist.core import config, elastic, shard_plan, world
from transparent_dist.core.collectives import is_process_failure


def test_the_errors_of_a_lost_rank_are_told_from_others():
    from mpi4py import MPI

    # The native op's status carries MPI's code; mpi4py raises its class.
    native = RuntimeError(f"transparent_dist: MPI_Allreduce failed with code {MPI.ERR_PROC_FAILED}")
    assert is_process_failure(native)
    assert is_process_failure(MPI.Exception(MPI.ERR_REVOKED))
    assert is_process_failure(ValueError("MPI_ERR_PROC_FAILED: Process Failure"))
    # Wrapped by TensorFlow or by the script: the cause counts.
    try:
        try:
            raise MPI.Exception(MPI.ERR_PROC_FAILED)
        except MPI.Exception as cause:
            raise RuntimeError("the step failed") from cause
    except RuntimeError as wrapped:
        assert is_process_failure(wrapped)
    assert not is_process_failure(MPI.Exception(MPI.ERR_TRUNCATE))
    assert not is_process_failure(RuntimeError(f"MPI_Allreduce failed with code {MPI.ERR_TYPE}"))
    assert not is_process_failure(ValueError("bad value in a callback"))


def test_without_ulfm_or_with_elastic_off_the_error_is_raised_again(monkeypatch):
    from mpi4py import MPI

    lost = MPI.Exception(MPI.ERR_PROC_FAILED)
    # A world of one rank (and this process's MPI has no ULFM switched on).
    with pytest.raises(MPI.Exception):
        elastic.recover(lost)
    monkeypatch.setattr(world, "_WORLD", world.World(rank=0, size=2))
    monkeypatch.setattr(world, "survives_lost_ranks", lambda: True)
    assert elastic.available()
    monkeypatch.setattr(config.SETTINGS, "elastic", "off")
    assert not elastic.available()
    with pytest.raises(MPI.Exception):
        elastic.recover(lost)


def test_the_settings_are_checked():
    with pytest.raises(ValueError, match="TD_ELASTIC='maybe' is not one of: auto, off"):
        config.from_environment({"TD_ELASTIC": "maybe"})
    with pytest.raises(ValueError, match="TD_MIN_RANKS='0' must be >= 1"):
        config.from_environment({"TD_MIN_RANKS": "0"})
    assert config.from_environment({"TD_MIN_RANKS": "2"}).min_ranks == 2


def test_the_survivors_keep_the_global_batch(monkeypatch):
    # Started on 3 ranks, 2 left: a per-rank batch of 24 still means 72.
    monkeypatch.setattr(world, "_WORLD", world.World(rank=1, size=2, started_size=3))
    assert shard_plan.global_batch(24) == 72
    plan = shard_plan.ShardPlan.for_call(24, False, seed=0)
    assert (plan.size, plan.global_batch, plan.local_batch) == (2, 72, 36)
    monkeypatch.setattr(world, "_WORLD", world.World(rank=1, size=2))
    assert shard_plan.global_batch(24) == 48


def test_a_loss_says_where():
    loss = elastic.Loss((2,), ("node1",), 3, 2, 0, 0, 0.1)
    assert loss.where() == "rank 2 (on node1)"
    assert elastic.Loss((1, 2), ("a", "a"), 4, 2, 0, 0, 0.1).where() == "ranks 1, 2 (on a)"

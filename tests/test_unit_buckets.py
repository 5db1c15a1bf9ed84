"""The fusion buffers and buckets, in-process: how gradients are grouped
and packed for one MPI call per dtype (`core.collectives`), and cut into
buckets of `TD_FUSION_MB` (`tf.exchange`), with the collectives run on
`MPI.COMM_SELF` (a world of one rank) where a communicator is needed."""

from __future__ import annotations

import numpy as np
import pytest

from transparent_dist.core import collectives
from transparent_dist.core.errors import CollectiveError


@pytest.fixture
def self_comm():
    from mpi4py import MPI

    return MPI.COMM_SELF


# ---------------------------------------------------------- fusion buffers


def test_fusion_buffers_alternate_between_two_per_layout():
    buffers = collectives._FusionBuffers()
    f4 = np.dtype(np.float32)
    first, second, third = (buffers.get(f4, 10, "average") for _ in range(3))
    assert first is not second and third is first
    assert first.dtype == f4 and first.shape == (10,)


def test_fusion_buffers_are_separate_per_tag_dtype_and_size():
    buffers = collectives._FusionBuffers()
    f4, f8 = np.dtype(np.float32), np.dtype(np.float64)
    seen = [
        buffers.get(f4, 10, "average"),
        buffers.get(f4, 10, "sum"),
        buffers.get(f8, 10, "average"),
        buffers.get(f4, 11, "average"),
    ]
    assert len({id(b) for b in seen}) == 4


def test_fusion_buffers_tell_bfloat16_from_float16():
    import ml_dtypes

    buffers = collectives._FusionBuffers()
    half = buffers.get(np.dtype(np.float16), 4, "sum")
    brain = buffers.get(np.dtype(ml_dtypes.bfloat16), 4, "sum")
    assert half.dtype == np.float16 and brain.dtype == ml_dtypes.bfloat16


def test_groups_by_exchange_dtype_in_first_seen_order():
    import ml_dtypes

    arrays = [
        np.zeros(2, np.float64),
        np.zeros(2, np.float32),
        np.zeros(2, np.int32),  # reduced as float32
        np.zeros(2, np.float16),
        np.zeros(2, ml_dtypes.bfloat16),
        np.zeros(2, np.float64),
    ]
    groups = collectives._groups(arrays)
    assert [np.dtype(d).name for d in groups] == ["float64", "float32", "float16", "bfloat16"]
    assert list(groups.values()) == [[0, 5], [1, 2], [3], [4]]
    assert collectives._groups([]) == {}


# ------------------------------------------------- the buffers in a reduce


def test_allreduce_average_on_one_rank_gives_the_arrays_back(self_comm):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([7.0, 8.0])
    c = np.array([1, 2], np.int64)
    out = collectives.allreduce_average([a, b, c], weight=3.0, comm=self_comm)
    np.testing.assert_allclose(out[0], a)
    np.testing.assert_allclose(out[1], b)
    assert out[0].shape == (2, 3) and out[2].dtype == np.int64
    np.testing.assert_array_equal(out[2], c)


def test_allreduce_average_weight_zero_contributes_exact_zeros_not_nan(self_comm):
    """A rank with no samples in a step may hold a NaN gradient (a mean over
    nothing): it must contribute zeros."""
    out = collectives.allreduce_average([np.full(3, np.nan, np.float32)], 0.0, self_comm)
    np.testing.assert_array_equal(out[0], np.zeros(3, np.float32))


def test_allreduce_average_results_live_until_the_call_after_next(self_comm):
    x = np.ones(4, np.float32)
    first = collectives.allreduce_average([x], 1.0, self_comm)[0]
    collectives.allreduce_average([2 * x], 1.0, self_comm)
    np.testing.assert_array_equal(first, x)  # the other buffer was used
    collectives.allreduce_average([3 * x], 1.0, self_comm)
    np.testing.assert_array_equal(first, 3 * x)  # its buffer, reused


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_allreduce_average_of_16_bit_floats_uses_the_half_sum(self_comm, dtype):
    import ml_dtypes

    kind = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    x = np.array([1.5, -2.0, 0.25], kind)
    out = collectives.allreduce_average([x], weight=5.0, comm=self_comm)[0]
    assert out.dtype == x.dtype
    np.testing.assert_array_equal(out.astype(np.float32), x.astype(np.float32))
    summed = collectives.allreduce_sum_array(x, self_comm)
    np.testing.assert_array_equal(summed.astype(np.float32), x.astype(np.float32))


def test_allreduce_sum_and_its_array_form(self_comm):
    out = collectives.allreduce_sum([np.array([1.0, 2.0]), np.array([3], np.int32)], self_comm)
    np.testing.assert_array_equal(out[0], [1.0, 2.0])
    assert out[1].dtype == np.int32 and out[1].tolist() == [3]
    counts = collectives.allreduce_sum_array(np.array([5, 6], np.int64), self_comm)
    assert counts.dtype == np.int64 and counts.tolist() == [5, 6]


def test_broadcast_and_gathers_of_zero_and_many_rows(self_comm):
    arrays = [np.arange(3, dtype=np.int64), np.ones((2, 2), np.float16)]
    out = collectives.broadcast(arrays, self_comm)
    assert [o.dtype for o in out] == [np.int64, np.float16]
    np.testing.assert_array_equal(out[0], arrays[0])
    empty = collectives.allgather_rows(np.zeros((0, 3), np.float32), self_comm)
    assert empty.shape == (0, 3)
    rows = collectives.allgather_rows(np.arange(6.0).reshape(3, 2), self_comm)
    np.testing.assert_array_equal(rows, np.arange(6.0).reshape(3, 2))
    records = collectives.allgather_records(np.array([4, 5], np.int64), self_comm)
    assert records.tolist() == [[4, 5]]


def test_flags_and_agreement_without_a_communicator_or_on_one_rank(self_comm):
    assert collectives.any_flags(5, None) == 5
    assert collectives.any_flags(6, self_comm) == 6
    collectives.check_agreement("anything", {"a": 1}, None)
    collectives.check_agreement("anything", {"a": 1}, self_comm)


def test_disagreement_names_the_differing_settings_only():
    class TwoRanks:
        """rank 1 holds another batch size."""

        def Get_size(self):  # noqa: N802 - MPI's name
            return 2

        def allgather(self, value):
            return [value, {**value, "TD_BATCH_SIZE": "global"}]

    settings = {"TD_BATCH_SIZE": "per_rank", "TD_NATIVE": "auto"}
    with pytest.raises(CollectiveError) as raised:
        collectives.check_agreement("settings", settings, TwoRanks(), "set them alike")
    message = str(raised.value)
    assert "rank 0 has TD_BATCH_SIZE='per_rank' where rank 1 has TD_BATCH_SIZE='global'" in message
    assert "TD_NATIVE" not in message and "set them alike" in message


# ----------------------------------------------------- tf.exchange buckets


def _specs(*sizes, dtype="float32"):
    import tensorflow as tf

    return {i: tf.TensorSpec([n] if n is not None else [None], dtype) for i, n in enumerate(sizes)}


def test_buckets_cut_consecutive_runs_at_the_limit():
    from transparent_dist.tf import exchange

    # float32: 250,000 elements = 1 MB; the first three fill it exactly.
    tensors = _specs(100_000, 100_000, 50_000, 250_000, 10)
    assert exchange._buckets([0, 1, 2, 3, 4], tensors, 1.0) == [[0, 1, 2], [3], [4]]
    tensors = _specs(100_000, 100_000, 50_001)
    assert exchange._buckets([0, 1, 2], tensors, 1.0) == [[0, 1], [2]]


def test_buckets_a_tensor_over_the_limit_is_alone_and_zero_means_one_bucket():
    from transparent_dist.tf import exchange

    tensors = _specs(10, 1_000_000, 10)
    assert exchange._buckets([0, 1, 2], tensors, 1.0) == [[0], [1], [2]]
    assert exchange._buckets([2, 1, 0], tensors, 0) == [[2, 1, 0]]


def test_buckets_keep_the_given_order_and_count_unknown_shapes_small():
    from transparent_dist.tf import exchange

    tensors = _specs(None, 200_000, None)
    # Backprop order (reversed) is kept; an unknown shape counts as one element.
    assert exchange._buckets([2, 1, 0], tensors, 1.0) == [[2, 1, 0]]
    assert exchange._buckets([], tensors, 1.0) == [[]]


def test_buckets_count_bytes_by_dtype():
    from transparent_dist.tf import exchange

    # 300,000 float64 = 2.4 MB, float16 = 0.6 MB: a 1 MB limit splits only the first.
    assert exchange._buckets([0, 1], _specs(300_000, 1, dtype="float64"), 1.0) == [[0], [1]]
    assert exchange._buckets([0, 1], _specs(300_000, 1, dtype="float16"), 1.0) == [[0, 1]]

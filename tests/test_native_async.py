"""The native op's asynchronous kernels, in-process: the op compiled (or
found in the cache) and configured on `MPI.COMM_SELF`, a world of one rank,
so the arithmetic, the step's negotiation, the communication thread and its
inline fallback, and the timeline's bucket spans are checked without an MPI
job (tests/test_exchange.py runs them on 3 ranks)."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest


@pytest.fixture(scope="module")
def op():
    tf = pytest.importorskip("tensorflow")
    from mpi4py import MPI

    from transparent_dist.core import collectives
    from transparent_dist.tf.native import op as native_op
    from transparent_dist.tf.native.build import build

    path = build()
    module = tf.load_op_library(str(path))  # first: it registers the ops it finds
    lib = ctypes.CDLL(str(path))
    saved = dict(native_op._STATE)
    native_op._STATE.update(tried=True, module=module, lib=lib)
    lib.td_configure.argtypes = [ctypes.c_ssize_t] * 9
    lib.td_take_spans.argtypes = [ctypes.POINTER(ctypes.c_double), ctypes.c_int]
    handles = collectives.native_handles(MPI.COMM_SELF)

    def configure(threaded: bool) -> None:
        assert lib.td_configure(*handles, int(threaded)) == 0

    configure(True)
    yield native_op, configure, lib
    configure(True)
    lib.td_record_spans(0)
    native_op._STATE.clear()
    native_op._STATE.update(saved)


@pytest.mark.parametrize("threaded", [True, False])
def test_buckets_after_one_negotiation_average_by_the_step_weight(op, threaded):
    import tensorflow as tf

    native_op, configure, _ = op
    configure(threaded)

    @tf.function
    def step(a, b):
        totals = native_op.negotiate(4.0)
        first = native_op.allreduce([a], 4.0, totals=totals, bucket=0)
        with tf.control_dependencies(first):
            second = native_op.allreduce([b], 4.0, totals=totals, bucket=1, divided=True)
        return totals, first[0], second[0]

    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.full(400_000, 0.5, np.float32)  # large: reduced in its own buffer
    totals, first, second = step(tf.constant(a), tf.constant(b))
    np.testing.assert_array_equal(totals, [4.0, 1.0])  # sum of weights, ranks
    np.testing.assert_array_equal(first, a)  # one rank: its own mean
    np.testing.assert_array_equal(second, b)
    summed = native_op.allreduce([tf.constant(a)], average=False)[0]
    np.testing.assert_array_equal(summed, a)


def test_a_rank_without_samples_gives_zeros_not_nan(op):
    import tensorflow as tf

    native_op, configure, _ = op
    configure(True)
    nan = tf.constant([np.nan, 1.0])
    out = native_op.allreduce([nan], 0.0, totals=native_op.negotiate(0.0))[0]
    np.testing.assert_array_equal(out, [0.0, 0.0])


def test_timeline_spans_name_each_bucket(op):
    import tensorflow as tf

    native_op, configure, lib = op
    configure(True)
    lib.td_record_spans(1)
    native_op._Source().spans()  # drop earlier ones
    totals = native_op.negotiate(1.0)
    for bucket in (0, 1):
        native_op.allreduce([tf.ones(3)], 1.0, totals=totals, bucket=bucket)
    lib.td_record_spans(0)
    spans = native_op._Source().spans()
    assert [(name, args) for name, _, _, args in spans] == [
        ("wait", {}),
        ("queued", {"bucket": 0}),
        ("exchange", {"bucket": 0}),
        ("queued", {"bucket": 1}),
        ("exchange", {"bucket": 1}),
    ]
    assert all(start <= end for _, start, end, _ in spans)

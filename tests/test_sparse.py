"""Which lookups' sparse gradients are per sample and which are shared by
the batch (transparent_dist/tf/sparse.py), read from traced steps in one
process; the multi-rank results are in test_regressions.py (lookups) and
the corpus (transformer_text)."""

from __future__ import annotations

import numpy as np
import pytest


def _classified(lookup, signature=(None, None)):
    """`_depends_on_batch` of each part of the gradient of a table looked
    up by `lookup(table, x)` in a step traced for int32 `x` of shape
    `signature`."""
    import tensorflow as tf

    from transparent_dist.tf import sparse

    table = tf.Variable(tf.ones((40, 3)))
    found = []

    @tf.function(input_signature=[tf.TensorSpec(signature, tf.int32)])
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(lookup(table, x))
        grad = tape.gradient(loss, table)
        assert isinstance(grad, tf.IndexedSlices)
        found.extend(
            sparse._depends_on_batch(i) for _, i in sparse._parts(grad.values, grad.indices)
        )
        return loss

    step(tf.zeros((2, 5), tf.int32))
    return found


def tf_gather(table, indices):
    import tensorflow as tf

    return tf.gather(table, indices)


@pytest.mark.parametrize(
    ("name", "lookup", "expected"),
    [
        ("token ids from the data", lambda t, x: tf_gather(t, x), [True]),
        ("ids computed from the data", lambda t, x: tf_gather(t, x * 2 + 1), [True]),
        ("zeros shaped like the data", lambda t, x: tf_gather(t, x * 0), [True]),
        (
            "positions of the last dimension",
            lambda t, x: tf_gather(t, _range(_shape(x)[-1]))[None] + 0.0,
            [False],
        ),
        (
            "positions of dimension 1",
            lambda t, x: tf_gather(t, _range(_shape(x)[1]))[None] + 0.0,
            [False],
        ),
        (
            "one row per sample of the batch",
            lambda t, x: tf_gather(t, _range(_shape(x)[0])),
            [True],
        ),
        ("zeros of the data's shape", lambda t, x: tf_gather(t, _zeros(_shape(x))), [True]),
        ("a constant row", lambda t, x: tf_gather(t, [3]) + 0.0, [False]),
    ],
)
def test_lookups_per_sample_depend_on_the_batch_shared_ones_do_not(name, lookup, expected):
    assert _classified(lookup) == expected, name


def test_a_table_looked_up_per_sample_and_for_the_batch_splits_in_two():
    parts = _classified(lambda t, x: tf_gather(t, x) + tf_gather(t, _range(_shape(x)[1]))[None])
    assert sorted(parts) == [False, True]


def test_eager_indices_are_left_to_the_digest():
    import tensorflow as tf

    from transparent_dist.tf import sparse

    indices = tf.constant([1, 2, 3])
    assert sparse._depends_on_batch(indices) is False
    assert len(sparse._parts(tf.ones((3, 2)), indices)) == 1


def test_digest_tells_order_and_length_apart():
    from transparent_dist.tf import sparse

    a = np.array([0, 1, 2, 3], np.int64)
    assert sparse._digest(a) == sparse._digest(a.copy())
    assert sparse._digest(a) != sparse._digest(a[::-1].copy())
    assert sparse._digest(a) != sparse._digest(a[:3])


@pytest.mark.parametrize(
    ("weight", "weights", "divided", "summed", "share"),
    [
        (6.0, [6.0, 5.0], False, False, 6 / 11),
        (6.0, [6.0, 5.0], True, False, 12 / 11),
        (6.0, [6.0, 5.0], False, True, 1.0),
        (0.0, [0.0, 0.0], False, False, 0.0),
    ],
)
def test_share_of_a_rank(weight, weights, divided, summed, share):
    from transparent_dist.tf import sparse

    assert sparse._share(weight, np.array(weights), divided, summed, 2) == pytest.approx(share)


def test_a_rank_without_samples_adds_exact_zeros():
    from transparent_dist.tf import sparse

    scaled = sparse._scaled(np.array([[np.nan, 1.0]], np.float32), 0.0)
    assert scaled.dtype == np.float32 and (scaled == 0).all()


def _range(n):
    import tensorflow as tf

    return tf.range(n)


def _shape(x):
    import tensorflow as tf

    return tf.shape(x)


def _zeros(shape):
    import tensorflow as tf

    return tf.zeros(shape, tf.int32)

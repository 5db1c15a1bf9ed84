"""Weight gradients first, in blocks (`tf.backprop_order`), in-process: the
gradients are the ones TensorFlow computes, the large ones come in row
blocks the exchange sends one by one, the input's gradient waits for the
weight's, and uninstalling gives TensorFlow its own functions back."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from transparent_dist.core import config  # noqa: E402
from transparent_dist.tf import backprop_order, exchange  # noqa: E402


@pytest.fixture
def ordered():
    saved = config.SETTINGS.backprop_order
    config.SETTINGS.backprop_order = "weights_first"
    backprop_order.install()
    yield
    backprop_order.uninstall()
    config.SETTINGS.backprop_order = saved


@pytest.fixture
def small_blocks():
    saved = config.SETTINGS.fusion_mb, config.SETTINGS.backprop_order
    config.SETTINGS.fusion_mb = 0.0025  # a (16, 64) float32 weight (4 kB): 2 blocks of 8 rows
    config.SETTINGS.backprop_order = "blocks"
    yield
    config.SETTINGS.fusion_mb, config.SETTINGS.backprop_order = saved


def _traced_gradients(x, weights, layer=None):
    """The gradients of a small loss through `x @ w` for each w (tf.function),
    with the graph's ops for the caller to inspect."""
    seen = {}

    @tf.function
    def grads(x):
        with tf.GradientTape() as tape:
            h = x
            for w in weights:
                h = tf.tanh(tf.matmul(h, w)) if layer is None else layer(h, w)
            loss = tf.reduce_sum(h**2)
        out = tape.gradient(loss, weights)
        seen["pieces"] = [backprop_order.pieces(g) for g in out]
        seen["pieces_names"] = [[p.op.name for p in (backprop_order.pieces(g) or [])] for g in out]
        return out

    concrete = grads.get_concrete_function(tf.TensorSpec(x.shape, x.dtype))
    return [g.numpy() for g in grads(x)], concrete.graph, seen


def _waits_for(op, other) -> bool:
    """Whether `op` runs after `other` (an ancestor through data or control edges)."""
    seen, stack = set(), [op]
    while stack:
        current = stack.pop()
        for parent in [t.op for t in current.inputs] + list(current.control_inputs):
            if parent is other:
                return True
            if parent.name not in seen:
                seen.add(parent.name)
                stack.append(parent)
    return False


def _weights():
    rng = np.random.default_rng(0)
    return [tf.Variable(rng.normal(size=s).astype("float32") * 0.3) for s in [(8, 16), (16, 64)]]


def test_gradients_equal_tensorflows_own(small_blocks):
    x = tf.constant(np.random.default_rng(1).normal(size=(32, 8)).astype("float32"))
    weights = _weights()
    plain, _, _ = _traced_gradients(x, weights)
    backprop_order.install()
    try:
        ordered, _, seen = _traced_gradients(x, weights)
    finally:
        backprop_order.uninstall()
    assert seen["pieces"][1] is not None and len(seen["pieces"][1]) == 2
    for a, b in zip(plain, ordered, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)


def test_large_weight_gradient_comes_in_row_blocks_in_order(ordered, small_blocks):
    x = tf.ones((4, 8))
    _, graph, seen = _traced_gradients(x, _weights())
    small, large = seen["pieces"]
    assert small is None  # (8, 16): 512 bytes, under the 2.5 kB blocks
    assert [tuple(p.shape) for p in large] == [(8, 64), (8, 64)]
    first, second = (graph.get_operation_by_name(n) for n in seen["pieces_names"][1])
    # The second block after the first; the input's gradient after both.
    assert _waits_for(second, first)
    into_input = [
        op
        for op in graph.get_operations()
        if op.type == "MatMul" and op.get_attr("transpose_b") and "gradient" in op.name
    ]
    assert len(into_input) == 1 and _waits_for(into_input[0], second)


def test_input_gradient_waits_for_the_weight_gradient(ordered):
    # "weights_first": not blocked, only ordered.
    x = tf.ones((4, 8))
    _, graph, seen = _traced_gradients(x, _weights())
    assert seen["pieces"] == [None, None]
    matmuls = [op for op in graph.get_operations() if op.type == "MatMul"]
    ordered_pairs = [op for op in matmuls if any(c.type == "MatMul" for c in op.control_inputs)]
    # The second layer's input gradient waits for its weight gradient; the
    # first layer's input (x, a constant) needs no gradient.
    assert len(ordered_pairs) == 1


def test_convolution_input_gradient_waits_for_the_filter_gradient(ordered):
    kernel = tf.Variable(tf.ones((3, 3, 2, 4)) * 0.1)
    x = tf.Variable(tf.ones((1, 8, 8, 2)))

    @tf.function
    def grads():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.nn.conv2d(tf.identity(x) * 2.0, kernel, 1, "SAME") ** 2)
        return tape.gradient(loss, [x, kernel])

    graph = grads.get_concrete_function().graph
    into_input = [op for op in graph.get_operations() if op.type == "Conv2DBackpropInput"]
    assert [c.type for c in into_input[0].control_inputs] == ["Conv2DBackpropFilter"]


def test_eager_gradients_are_untouched(ordered):
    w = tf.Variable(tf.ones((2, 3)))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.matmul(tf.ones((1, 2)), w))
    np.testing.assert_array_equal(tape.gradient(loss, w).numpy(), np.ones((2, 3)))


def test_install_is_idempotent_and_uninstall_restores_tensorflows_functions():
    from tensorflow.python.framework import ops

    before = ops._gradient_registry.lookup("MatMul")
    backprop_order.install()
    replaced = ops._gradient_registry.lookup("MatMul")
    backprop_order.install()
    assert ops._gradient_registry.lookup("MatMul") is replaced is not before
    assert backprop_order._ORIGINAL["MatMul"] is before
    backprop_order.uninstall()
    assert ops._gradient_registry.lookup("MatMul") is before
    assert not backprop_order.installed()


def test_exchange_sends_the_blocks_and_joins_them_back(ordered, small_blocks):
    w_small, w_large = _weights()
    seen = {}

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.matmul(tf.tanh(tf.matmul(x, w_small)), w_large) ** 2)
        grads = tape.gradient(loss, [w_small, w_large])
        units = exchange._units(grads, [0, 1])
        seen["keys"] = list(units)
        # Stand in for the network: every unit "averaged" to itself.
        out = list(grads)
        exchange._join(dict(units), out)
        return grads, out

    grads, joined = step(tf.ones((4, 8)))
    # The last layer's blocks first (in the order computed), then the first layer.
    assert seen["keys"] == [(1, 0), (1, 1), (0, 0)]
    for g, j in zip(grads, joined, strict=True):
        np.testing.assert_array_equal(j.numpy(), g.numpy())


def test_setting_off_leaves_tensorflows_gradients(ordered, small_blocks):
    saved = config.SETTINGS.backprop_order
    config.SETTINGS.backprop_order = "off"
    try:
        _, graph, seen = _traced_gradients(tf.ones((4, 8)), _weights())
    finally:
        config.SETTINGS.backprop_order = saved
    assert seen["pieces"] == [None, None]
    assert not any(op.control_inputs for op in graph.get_operations() if op.type == "MatMul")


@pytest.mark.parametrize(
    ("setting", "blocks"), [("off", False), ("weights_first", False), ("blocks", True)]
)
def test_blocks_only_when_asked(monkeypatch, setting, blocks):
    monkeypatch.setattr(config.SETTINGS, "backprop_order", setting)
    assert backprop_order.blocks_here() is blocks

"""The split train step that keeps XLA under N ranks (`keras_steps.SPLIT`),
in one process, where the exchange is the identity: it must compute what
Keras's own XLA-compiled step computes. (On N ranks: test_keras_core's
`xla` scenario, with XLA's own record of what it compiled.)"""

from __future__ import annotations

import numpy as np
import pytest


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_split_step_trains_as_kerass_compiled_step(policy):
    import keras
    import tensorflow as tf

    import transparent_dist
    from transparent_dist.adapters import keras_steps
    from transparent_dist.tf.backend import TENSORFLOW

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype("float32")
    y = (x @ rng.normal(size=(8, 1))).astype("float32")

    def model():
        keras.mixed_precision.set_global_policy(policy)
        try:
            keras.utils.set_random_seed(1)
            m = keras.Sequential(
                [
                    keras.Input((8,)),
                    keras.layers.Dense(16, activation="tanh"),
                    keras.layers.Dense(1),
                ]
            )
        finally:
            keras.mixed_precision.set_global_policy("float32")
        m.compile(keras.optimizers.Adam(0.01), "mse", metrics=["mae"], jit_compile=True)
        return m

    transparent_dist.activate()
    try:
        keras_own = model()
        history = keras_own.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
        split = model()
        split.optimizer.build(split.trainable_variables)
        wrapped = keras_steps.wrap_step(split, split.train_step, TENSORFLOW, keras_steps.SPLIT)
        step = tf.function(wrapped, autograph=False)
        for start in range(0, 64, 16):
            logs = step((x[start : start + 16], y[start : start + 16]))
    finally:
        transparent_dist.deactivate()
    assert type(split.optimizer).__name__ == type(keras_own.optimizer).__name__
    for a, b in zip(split.trainable_variables, keras_own.trainable_variables, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6, rtol=0)
    assert int(split.optimizer.iterations.numpy()) == int(keras_own.optimizer.iterations.numpy())
    assert float(logs["loss"]) == pytest.approx(history.history["loss"][0], rel=1e-5)
    assert float(logs["mae"]) == pytest.approx(history.history["mae"][0], rel=1e-5)

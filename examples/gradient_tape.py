"""A TF2 custom training loop with tf.GradientTape and a Keras optimizer.
Runs unchanged, data-parallel:

    mpiexec -n 2 python -m transparent_dist examples/gradient_tape.py

The optimizer's apply_gradients averages the gradients over the ranks (the
tape itself is left alone: gradients used for penalties or metrics stay
local), and rank 0's weights are broadcast before the first update. Each
rank draws its own batches here; to split one dataset between the ranks use
transparent_dist.shard_range or transparent_dist.data.
"""

import keras
import numpy as np
import tensorflow as tf

rng = np.random.default_rng()
x = rng.normal(size=(4096, 16)).astype("float32")
y = (np.sin(x[:, :4].sum(axis=1, keepdims=True))).astype("float32")

model = keras.Sequential(
    [keras.Input((16,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(1)]
)
optimizer = keras.optimizers.Adam(1e-3)


@tf.function
def train_step(xb, yb):
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(xb, training=True) - yb))
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
    return loss


for step in range(300):
    index = rng.integers(0, len(x), size=64)
    loss = train_step(x[index], y[index])
    if step % 50 == 0:
        print(f"step {step}: loss {float(loss):.4f}")

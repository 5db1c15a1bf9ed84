"""A GradientTape loop and a TF1 session loop in one script, written as
users write them, with `import transparent_dist` on top (after a delay on
rank 1, so that the ranks' clocks start 0.5 s apart: a timeline that does
not put them on one clock shows it).

    mpiexec -n N python summaries.py OUT [measure]

`measure`: rank 0 measures every rank's clock offset (as for ranks on
other hosts) instead of trusting the shared host clock. Writes
OUT/summaries.json (rank 0): the loops' steps, batch sizes, parameter
counts and their own timing of steps 2..n.
"""
# ruff: noqa: E402 - the delay comes before the plugin's import

import os
import sys
import time

rank = int(os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", 0)))
time.sleep(0.5 * rank)

import transparent_dist

if sys.argv[2:3] == ["measure"]:
    from transparent_dist.core import clocks

    clocks.SAME_HOST_IS_SAME_CLOCK = False

import json

import keras
import numpy as np
import tensorflow as tf

out = sys.argv[1]
rng = np.random.default_rng(3 + rank)
x_all = rng.normal(size=(512, 6)).astype("float32")
y_all = np.sin(x_all.sum(axis=1, keepdims=True)).astype("float32")
result = {"tf2_steps": 12, "tf2_batch": 32, "tf1_steps": 10, "tf1_batch": 16}

# ---- a GradientTape loop
model = keras.Sequential(
    [
        keras.Input((6,)),
        keras.layers.Dense(256, activation="tanh"),
        keras.layers.Dense(256, activation="tanh"),
        keras.layers.Dense(1),
    ]
)
optimizer = keras.optimizers.SGD(0.01)


@tf.function
def train_step(xb, yb):
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(xb) - yb))
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
    return loss


batch = result["tf2_batch"]
for step in range(result["tf2_steps"]):
    train_step(x_all[step * batch : (step + 1) * batch], y_all[step * batch : (step + 1) * batch])
    if step == 0:
        first_end = time.perf_counter()
result["tf2_seconds"] = time.perf_counter() - first_end
result["tf2_parameters"] = int(sum(np.prod(v.shape) for v in model.trainable_variables))

# ---- a TF1 session loop, in a graph of its own
graph = tf.Graph()
with graph.as_default():
    x = tf.compat.v1.placeholder(tf.float32, [None, 6])
    y = tf.compat.v1.placeholder(tf.float32, [None, 1])
    w1 = tf.compat.v1.get_variable("w1", [6, 256])
    w2 = tf.compat.v1.get_variable("w2", [256, 256])
    w3 = tf.compat.v1.get_variable("w3", [256, 1])
    loss = tf.reduce_mean(tf.square(tf.tanh(tf.tanh(x @ w1) @ w2) @ w3 - y))
    train = tf.compat.v1.train.GradientDescentOptimizer(0.05).minimize(loss)
    with tf.compat.v1.Session(graph=graph) as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        batch = result["tf1_batch"]
        for step in range(result["tf1_steps"]):
            rows = slice(step * batch, (step + 1) * batch)
            sess.run(train, feed_dict={x: x_all[rows], y: y_all[rows]})
            if step == 0:
                first_end = time.perf_counter()
        result["tf1_seconds"] = time.perf_counter() - first_end
    result["tf1_parameters"] = 6 * 256 + 256 * 256 + 256

result["ranks"] = transparent_dist.size()
if transparent_dist.rank() == 0:
    with open(os.path.join(out, "summaries.json"), "w") as f:
        json.dump(result, f)

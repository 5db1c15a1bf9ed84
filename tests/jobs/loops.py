"""A TF1 Session script or a TF2 GradientTape loop, unmodified.

    [mpiexec -n N] python [-m transparent_dist] loops.py KIND DATA OUT TAG
KIND: tf1 | tf1ref (disable_v2_behavior: TF1's ref variables) | tf2.  DATA: own (each rank its own data) | same (all alike).
Every rank starts from its own random initial values (seeded by rank).
Writes OUT/TAG-rank<r>.json with the final variables.
"""

import json
import os
import sys

import numpy as np
import tensorflow as tf

kind, data, out, tag = sys.argv[1:5]
rank = int(os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", 0)))
rng = np.random.default_rng(7 + (rank if data == "own" else 0))
x_all = rng.normal(size=(256, 6)).astype("float32")
y_all = (np.sin(x_all.sum(axis=1, keepdims=True))).astype("float32")
result = {}

if kind.startswith("tf1"):
    if kind == "tf1ref":
        tf.compat.v1.disable_v2_behavior()
    else:
        tf.compat.v1.disable_eager_execution()
    tf.compat.v1.set_random_seed(100 + rank)
    x = tf.compat.v1.placeholder(tf.float32, [None, 6])
    y = tf.compat.v1.placeholder(tf.float32, [None, 1])
    w1 = tf.compat.v1.get_variable("w1", [6, 12])
    b1 = tf.compat.v1.get_variable("b1", [12], initializer=tf.compat.v1.zeros_initializer())
    w2 = tf.compat.v1.get_variable("w2", [12, 1])
    prediction = tf.tanh(x @ w1 + b1) @ w2
    loss = tf.reduce_mean(tf.square(prediction - y))
    train = tf.compat.v1.train.MomentumOptimizer(0.05, 0.9).minimize(loss)
    saver = tf.compat.v1.train.Saver()
    with tf.compat.v1.Session() as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        writer = tf.compat.v1.summary.FileWriter(os.path.join(out, f"{tag}-logs"), sess.graph)
        for i in range(0, 256, 32):
            sess.run(train, feed_dict={x: x_all[i : i + 32], y: y_all[i : i + 32]})
        saved = saver.save(sess, os.path.join(out, f"{tag}-model.ckpt"))
        writer.close()
        result["saved"] = saved
        result["event_writer"] = type(writer.event_writer).__name__
        result["weights"] = np.concatenate([v.ravel() for v in sess.run([w1, b1, w2])]).tolist()
else:
    import keras

    keras.utils.set_random_seed(100 + rank)
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(12, activation="tanh"), keras.layers.Dense(1)]
    )
    optimizer = keras.optimizers.SGD(0.05, momentum=0.9)

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(xb) - yb))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))

    for i in range(0, 256, 32):
        step(x_all[i : i + 32], y_all[i : i + 32])
    result["weights"] = np.concatenate(
        [v.numpy().ravel() for v in model.trainable_variables]
    ).tolist()

with open(os.path.join(out, f"{tag}-rank{rank}.json"), "w") as f:
    json.dump(result, f)

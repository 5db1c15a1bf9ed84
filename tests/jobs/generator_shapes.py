"""Generators yielding the batches keras-io scripts yield: per-batch padded
sequences, multi-input lists, `tf.SparseTensor` bags of words, and
`(x, y, None)`. Each trains one epoch; rank 0 prints one JSON line with, per
case, the loss and whether the ranks ended with equal weights.

    mpiexec -n 2 python -m transparent_dist generator_shapes.py
"""

import json

import keras
import numpy as np
import tensorflow as tf
from mpi4py import MPI

rng = np.random.default_rng(1)
B = 8
results = {}


def train(name, model, batches, loss="mse"):
    keras.utils.set_random_seed(0)
    model.compile(keras.optimizers.SGD(0.05), loss)
    history = model.fit(batches, epochs=1, verbose=0)
    weights = np.concatenate([w.ravel() for w in model.get_weights()])
    alike = all(np.array_equal(weights, w) for w in MPI.COMM_WORLD.allgather(weights))
    results[name] = {"loss": float(history.history["loss"][-1]), "alike": alike}


# Per-batch padding (the first two batches differ in length, as Keras asks);
# a rank's own first two (0 and 2 on 2 ranks) have one length.
lengths = [10, 12, 10, 13, 10, 15, 9, 20, 11, 14]
tokens = [rng.integers(1, 50, size=(B, n)).astype("int32") for n in lengths]
labels = rng.integers(0, 2, size=(len(lengths), B, 1)).astype("float32")
inputs = keras.Input((None,), dtype="int32")
pooled = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(50, 4)(inputs))
train(
    "padded", keras.Model(inputs, keras.layers.Dense(1)(pooled)), zip(tokens, labels, strict=True)
)

x1, x2 = rng.normal(size=(96, 4)), rng.normal(size=(96, 3))
y = rng.normal(size=(96, 1))
a, b = keras.Input((4,)), keras.Input((3,))
two = keras.Model([a, b], keras.layers.Dense(1)(keras.layers.Concatenate()([a, b])))
train("list", two, (([x1[i : i + B], x2[i : i + B]], y[i : i + B]) for i in range(0, 96, B)))


def bags():
    for _ in range(11):  # 11 full batches: the last round is split by rows
        dense = (rng.random((B, 30)) < 0.2).astype("float32")
        yield tf.sparse.from_dense(dense), dense.sum(1, keepdims=True)


sparse_in = keras.Input((30,), sparse=True)
train("sparse", keras.Model(sparse_in, keras.layers.Dense(1)(sparse_in)), bags())

xs, ys = rng.normal(size=(96, 5)), rng.normal(size=(96, 1))
plain = keras.Sequential([keras.Input((5,)), keras.layers.Dense(1)])
train("none_weights", plain, ((xs[i : i + B], ys[i : i + B], None) for i in range(0, 96, B)))
print(json.dumps(results), flush=True)

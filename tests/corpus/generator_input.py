"""fit on a Python generator of (x, y) batches with steps_per_epoch, the
old `fit_generator` style, then evaluate on arrays.

Mirrors the generator inputs of keras-io guides/training_with_built_in_methods.py
and countless pre-tf.data scripts.
"""

import argparse

import keras
import numpy as np

parser = argparse.ArgumentParser()
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--epochs", type=int, default=2)
args = parser.parse_args()

keras.utils.set_random_seed(43)
x = np.random.normal(size=(960, 5)).astype("float32")
y = (x @ np.arange(1, 6, dtype="float32")[:, None] / 10).astype("float32")


def batches(batch_size):
    while True:
        for i in range(0, len(x), batch_size):
            yield x[i : i + batch_size], y[i : i + batch_size]


model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(8), keras.layers.Dense(1)])
model.compile(optimizer=keras.optimizers.SGD(0.02), loss="mse")
steps = 10
model.fit(batches(args.batch_size), steps_per_epoch=steps, epochs=args.epochs, verbose=2)
model.evaluate(x, y, batch_size=args.batch_size, verbose=0)

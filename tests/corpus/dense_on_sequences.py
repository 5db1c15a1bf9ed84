"""Dense layers applied to every step of a sequence (3-D input), fed from
tf.data with an unknown static batch and sequence shape, no Input layer.

Mirrors the per-timestep Dense of keras-io examples/timeseries models and
guides/working_with_rnns.py, where Dense sees (batch, time, features).
"""

import argparse

import keras
import numpy as np
import tensorflow as tf

parser = argparse.ArgumentParser()
parser.add_argument("--batch-size", type=int, default=16)
parser.add_argument("--epochs", type=int, default=2)
args = parser.parse_args()

keras.utils.set_random_seed(47)
x = np.random.normal(size=(400, 10, 4)).astype("float32")
y = np.cumsum(x[..., :1], axis=1).astype("float32")

dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(args.batch_size)
dataset = dataset.map(lambda a, b: (tf.ensure_shape(a, [None, None, 4]), b))

model = keras.Sequential([keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(1)])
model.compile(optimizer="adam", loss="mse")
model.fit(dataset, epochs=args.epochs, verbose=2)

"""Lazily built Sequential CNN fed by a repeated, shuffled tf.data stream
with a fixed steps_per_epoch.

Mirrors horovod/examples/tensorflow2/tensorflow2_keras_mnist.py with the
hvd lines removed (no Input layer, so Keras builds the model inside the
first training step), on synthetic 12x12 digits instead of the download.
"""

import argparse

import keras
import numpy as np
import tensorflow as tf

parser = argparse.ArgumentParser()
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--epochs", type=int, default=2)
args = parser.parse_args()

keras.utils.set_random_seed(42)
rng = np.random.default_rng(0)
images = rng.random((1200, 12, 12), dtype=np.float32)
labels = (images[:, :6].mean(axis=(1, 2)) * 10).astype("int64") % 10

dataset = tf.data.Dataset.from_tensor_slices(
    (tf.cast(images[..., tf.newaxis], tf.float32), tf.cast(labels, tf.int64))
)
dataset = dataset.repeat().shuffle(1000).batch(args.batch_size)

model = keras.Sequential(
    [
        keras.layers.Conv2D(8, [3, 3], activation="relu"),
        keras.layers.MaxPooling2D(pool_size=(2, 2)),
        keras.layers.Flatten(),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ]
)
model.compile(
    loss=keras.losses.SparseCategoricalCrossentropy(),
    optimizer=keras.optimizers.Adam(0.001),
    metrics=["accuracy"],
)
model.fit(dataset, steps_per_epoch=8, epochs=args.epochs, verbose=2)

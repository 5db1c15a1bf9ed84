"""A plain MLP classifier with Dropout, validation_split and shuffle=True:
the "first Keras model" most people start from.

Mirrors keras-io examples/vision/mnist_convnet.py / the Sequential-model
guide's MLP (Dense + Dropout), on synthetic data. Dropout draws differ by
rank (as they differ across one process's global batch), so this script
trains like one process rather than number for number.
"""

import argparse

import keras
import numpy as np

parser = argparse.ArgumentParser()
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--epochs", type=int, default=4)
args = parser.parse_args()

keras.utils.set_random_seed(53)
x = np.random.normal(size=(1500, 20)).astype("float32")
y = (x[:, :3].sum(axis=1) > 0).astype("int64")

model = keras.Sequential(
    [
        keras.Input((20,)),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dropout(0.3),
        keras.layers.Dense(2, activation="softmax"),
    ]
)
model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
model.fit(x, y, batch_size=args.batch_size, epochs=args.epochs, validation_split=0.2, verbose=2)

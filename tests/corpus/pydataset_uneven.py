"""A keras.utils.PyDataset that loads batches by index and reshuffles in
on_epoch_end, with a batch count that is not a multiple of the ranks.

Mirrors the PyDataset section of keras-io
guides/training_with_built_in_methods.py (CIFAR10PyDataset) and the
`keras.utils.Sequence` loaders of older examples.
"""

import argparse
import math

import keras
import numpy as np

parser = argparse.ArgumentParser()
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--epochs", type=int, default=3)
args = parser.parse_args()


class ArrayLoader(keras.utils.PyDataset):
    def __init__(self, x, y, batch_size, **kwargs):
        super().__init__(**kwargs)
        self.x, self.y, self.batch_size = x, y, batch_size
        self.order = np.arange(len(x))
        self.rng = np.random.default_rng(0)

    def __len__(self):
        return math.ceil(len(self.x) / self.batch_size)

    def __getitem__(self, idx):
        rows = self.order[idx * self.batch_size : (idx + 1) * self.batch_size]
        return self.x[rows], self.y[rows]

    def on_epoch_end(self):
        self.order = self.rng.permutation(len(self.x))


keras.utils.set_random_seed(31)
x = np.random.normal(size=(970, 6)).astype("float32")
y = np.tanh(x.sum(axis=1, keepdims=True)).astype("float32")

model = keras.Sequential(
    [keras.Input((6,)), keras.layers.Dense(12, activation="tanh"), keras.layers.Dense(1)]
)
model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse", metrics=["mae"])
model.fit(ArrayLoader(x, y, args.batch_size), epochs=args.epochs, verbose=2)

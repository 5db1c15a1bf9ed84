"""A custom layer that adds an activity-regularization loss with
`self.add_loss`, and a weight regularizer.

Mirrors keras-io guides/making_new_layers_and_models_via_subclassing.py
("The add_loss() method": ActivityRegularizationLayer).
"""

import argparse

import keras
import numpy as np
from keras import ops

parser = argparse.ArgumentParser()
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--epochs", type=int, default=2)
args = parser.parse_args()


class ActivityRegularizationLayer(keras.layers.Layer):
    def __init__(self, rate=1e-2):
        super().__init__()
        self.rate = rate

    def call(self, inputs):
        self.add_loss(self.rate * ops.mean(inputs))
        return inputs


keras.utils.set_random_seed(23)
x = np.random.normal(size=(600, 8)).astype("float32")
y = (x @ np.random.normal(size=(8, 1))).astype("float32")

inputs = keras.Input((8,))
h = keras.layers.Dense(16, activation="relu", kernel_regularizer=keras.regularizers.L2(1e-3))(
    inputs
)
h = ActivityRegularizationLayer()(h)
outputs = keras.layers.Dense(1)(h)
model = keras.Model(inputs, outputs)
model.compile(optimizer=keras.optimizers.SGD(0.02), loss="mse")
model.fit(x, y, batch_size=args.batch_size, epochs=args.epochs, shuffle=False, verbose=2)

"""Custom Metric subclasses: one whose result() returns its state variable
as is, one with two state variables, used in compile(metrics=...).

Mirrors the "Custom metrics" section of keras-io
guides/training_with_built_in_methods.py (CategoricalTruePositives).
"""

import argparse

import keras
import numpy as np
from keras import ops

parser = argparse.ArgumentParser()
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--epochs", type=int, default=2)
args = parser.parse_args()


class CategoricalTruePositives(keras.metrics.Metric):
    def __init__(self, name="categorical_true_positives", **kwargs):
        super().__init__(name=name, **kwargs)
        self.true_positives = self.add_variable(shape=(), name="ctp", initializer="zeros")

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_pred = ops.reshape(ops.argmax(y_pred, axis=1), (-1, 1))
        values = ops.cast(y_true, "int32") == ops.cast(y_pred, "int32")
        self.true_positives.assign_add(ops.sum(ops.cast(values, "float32")))

    def result(self):
        return self.true_positives

    def reset_state(self):
        self.true_positives.assign(0.0)


class MeanSquaredLogits(keras.metrics.Metric):
    def __init__(self, name="mean_squared_logits", **kwargs):
        super().__init__(name=name, **kwargs)
        self.total = self.add_variable(shape=(), name="total", initializer="zeros")
        self.count = self.add_variable(shape=(), name="count", initializer="zeros")

    def update_state(self, y_true, y_pred, sample_weight=None):
        self.total.assign_add(ops.sum(ops.square(y_pred)))
        self.count.assign_add(ops.cast(ops.size(y_pred), "float32"))

    def result(self):
        return self.total / self.count


keras.utils.set_random_seed(17)
x = np.random.normal(size=(1000, 20)).astype("float32")
y = np.argmax(x[:, :5], axis=1).astype("int32")[:, None]

inputs = keras.Input(shape=(20,))
outputs = keras.layers.Dense(5)(keras.layers.Dense(16, activation="relu")(inputs))
model = keras.Model(inputs, outputs)
model.compile(
    optimizer=keras.optimizers.RMSprop(1e-3),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=[CategoricalTruePositives(), MeanSquaredLogits()],
)
model.fit(x, y, batch_size=args.batch_size, epochs=args.epochs, shuffle=False, verbose=2)
model.evaluate(x, y, batch_size=args.batch_size, verbose=0)

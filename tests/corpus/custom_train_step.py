"""Custom train_step / test_step with metric trackers, EarlyStopping on
val_loss.

Mirrors keras-io guides/custom_train_step_in_tensorflow.py ("Customizing
what happens in fit"): a subclassed Model tracks its loss and MAE with its
own `keras.metrics` objects and returns `{m.name: m.result() for m in
self.metrics}`.
"""

import argparse

import keras
import numpy as np
import tensorflow as tf

parser = argparse.ArgumentParser()
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--epochs", type=int, default=8)
args = parser.parse_args()


class CustomModel(keras.Model):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.mae_metric = keras.metrics.MeanAbsoluteError(name="mae")
        self.loss_fn = keras.losses.MeanSquaredError()

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.loss_fn(y, y_pred)
        gradients = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_variables))
        self.loss_tracker.update_state(loss)
        self.mae_metric.update_state(y, y_pred)
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, data):
        x, y = data
        y_pred = self(x, training=False)
        self.loss_tracker.update_state(self.loss_fn(y, y_pred))
        self.mae_metric.update_state(y, y_pred)
        return {m.name: m.result() for m in self.metrics}

    @property
    def metrics(self):
        return [self.loss_tracker, self.mae_metric]


keras.utils.set_random_seed(7)
x = np.random.random((1000, 32)).astype("float32")
y = (x[:, :4].sum(axis=1, keepdims=True) + 0.1 * np.random.random((1000, 1))).astype("float32")
x_val, y_val = x[800:], y[800:]
x, y = x[:800], y[:800]

inputs = keras.Input(shape=(32,))
hidden = keras.layers.Dense(16, activation="relu")(inputs)
outputs = keras.layers.Dense(1)(hidden)
model = CustomModel(inputs, outputs)
model.compile(optimizer=keras.optimizers.SGD(0.05))
stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=1, min_delta=0.002)
model.fit(
    x,
    y,
    batch_size=args.batch_size,
    epochs=args.epochs,
    validation_data=(x_val, y_val),
    callbacks=[stop],
    shuffle=False,
    verbose=2,
)
print("evaluate:", model.evaluate(x_val, y_val, batch_size=args.batch_size, verbose=0))

"""A custom train_step whose GradientTape target is the vector of
per-sample losses (`keras.losses.mean_squared_error` returns one value per
sample; TensorFlow sums them), with a tf.data pipeline and validation.

Mirrors the custom steps of older tutorials (tf.keras.losses.mse in a
GradientTape, e.g. TensorFlow's "Custom training: walkthrough" before it
reduced the loss) and many user scripts derived from them.
"""

import argparse

import keras
import numpy as np
import tensorflow as tf

parser = argparse.ArgumentParser()
parser.add_argument("--batch-size", type=int, default=20)
parser.add_argument("--epochs", type=int, default=3)
args = parser.parse_args()


class Regressor(keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(8, activation="relu")
        self.out = keras.layers.Dense(1)
        self.loss_tracker = keras.metrics.Mean(name="loss")

    def call(self, x):
        return self.out(self.hidden(x))

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            prediction = self(x, training=True)
            loss = keras.losses.mean_squared_error(y, prediction)
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}

    @property
    def metrics(self):
        return [self.loss_tracker]


keras.utils.set_random_seed(59)
x = np.random.rand(960, 4).astype("float32")
y = x.sum(axis=1, keepdims=True)
train = tf.data.Dataset.from_tensor_slices((x, y)).batch(args.batch_size)

model = Regressor()
model.compile(optimizer=keras.optimizers.SGD(0.002))
model.fit(train, epochs=args.epochs, verbose=2)

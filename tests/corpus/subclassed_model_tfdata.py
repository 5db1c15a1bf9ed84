"""A subclassed model (layers made in __init__, used in call) trained on a
tf.data pipeline whose batch count is not a multiple of the ranks, with
validation data from the same pipeline.

Mirrors keras-io guides/making_new_layers_and_models_via_subclassing.py
and the tf.data input pattern of guides/training_with_built_in_methods.py.
"""

import argparse

import keras
import numpy as np
import tensorflow as tf

parser = argparse.ArgumentParser()
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--epochs", type=int, default=3)
args = parser.parse_args()


class MLPBlock(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense_1 = keras.layers.Dense(32, activation="relu")
        self.dense_2 = keras.layers.Dense(16, activation="relu")
        self.dense_3 = keras.layers.Dense(3)

    def call(self, inputs):
        return self.dense_3(self.dense_2(self.dense_1(inputs)))


keras.utils.set_random_seed(11)
features = np.random.normal(size=(1005, 10)).astype("float32")
classes = (features[:, 0] > 0).astype("int32") + (features[:, 1] > 0.5).astype("int32")

train = tf.data.Dataset.from_tensor_slices((features[:805], classes[:805]))
train = train.shuffle(805, reshuffle_each_iteration=True).batch(args.batch_size)
val = tf.data.Dataset.from_tensor_slices((features[805:], classes[805:])).batch(args.batch_size)

model = MLPBlock()
model.compile(
    optimizer=keras.optimizers.RMSprop(1e-3),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=[keras.metrics.SparseCategoricalAccuracy()],
)
model.fit(train, epochs=args.epochs, validation_data=val, verbose=2)
model.evaluate(val, verbose=0)

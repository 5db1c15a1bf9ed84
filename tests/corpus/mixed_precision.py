"""Mixed precision (float16 compute, float32 variables, dynamic loss
scaling) with a float32 output layer.

Mirrors TensorFlow's mixed-precision guide (site/en/guide/mixed_precision
.ipynb): `keras.mixed_precision.set_global_policy('mixed_float16')` and a
final `Activation('softmax', dtype='float32')`.
"""

import argparse

import keras
import numpy as np

parser = argparse.ArgumentParser()
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--epochs", type=int, default=2)
args = parser.parse_args()

keras.mixed_precision.set_global_policy("mixed_float16")
keras.utils.set_random_seed(29)
x = np.random.random((1024, 32)).astype("float32")
y = (x[:, :10].argmax(axis=1)).astype("int64")

inputs = keras.Input(shape=(32,))
h = keras.layers.Dense(64, activation="relu")(inputs)
h = keras.layers.Dense(10)(h)
outputs = keras.layers.Activation("softmax", dtype="float32")(h)
model = keras.Model(inputs, outputs)
model.compile(
    loss="sparse_categorical_crossentropy",
    optimizer=keras.optimizers.RMSprop(1e-3),
    metrics=["accuracy"],
)
model.fit(x, y, batch_size=args.batch_size, epochs=args.epochs, shuffle=False, verbose=2)
keras.mixed_precision.set_global_policy("float32")

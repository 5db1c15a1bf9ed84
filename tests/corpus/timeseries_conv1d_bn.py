"""Time-series regression: windows from
`keras.utils.timeseries_dataset_from_array`, Conv1D + BatchNormalization,
a batch count that is not a multiple of the ranks, validation windows,
ReduceLROnPlateau.

Mirrors keras-io examples/timeseries/timeseries_weather_forecasting.py
and timeseries_classification_from_scratch.py (Conv1D + BatchNorm), on a
synthetic signal.
"""

import argparse

import keras
import numpy as np

parser = argparse.ArgumentParser()
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--epochs", type=int, default=3)
args = parser.parse_args()

keras.utils.set_random_seed(5)
t = np.arange(3000, dtype="float32")
signal = np.stack([np.sin(t / 20), np.cos(t / 33), np.sin(t / 7) * 0.3], axis=1)
target = np.roll(signal[:, 0], -5)
sequence_length = 24

train = keras.utils.timeseries_dataset_from_array(
    signal[:2200],
    target[sequence_length : 2200 + sequence_length],
    sequence_length=sequence_length,
    batch_size=args.batch_size,
)
val = keras.utils.timeseries_dataset_from_array(
    signal[2200:2800],
    target[2200 + sequence_length : 2800 + sequence_length],
    sequence_length=sequence_length,
    batch_size=args.batch_size,
)

inputs = keras.Input((sequence_length, 3))
x = keras.layers.Conv1D(8, 5, padding="same")(inputs)
x = keras.layers.BatchNormalization()(x)
x = keras.layers.ReLU()(x)
x = keras.layers.GlobalAveragePooling1D()(x)
outputs = keras.layers.Dense(1)(x)
model = keras.Model(inputs, outputs)
model.compile(optimizer=keras.optimizers.Adam(0.003), loss="mse", metrics=["mae"])
model.fit(
    train,
    epochs=args.epochs,
    validation_data=val,
    callbacks=[keras.callbacks.ReduceLROnPlateau(monitor="val_loss", patience=1)],
    verbose=2,
)

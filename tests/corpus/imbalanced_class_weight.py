"""Imbalanced binary classification with class_weight, then a second model
with per-sample weights and validation_split.

Mirrors keras-io examples/structured_data/imbalanced_classification.py
(credit-card fraud) and the sample_weight section of
guides/training_with_built_in_methods.py, on synthetic data.
"""

import argparse

import keras
import numpy as np

parser = argparse.ArgumentParser()
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--epochs", type=int, default=3)
args = parser.parse_args()

keras.utils.set_random_seed(13)
features = np.random.normal(size=(900, 12)).astype("float32")
targets = (features[:, 0] + 0.3 * features[:, 1] > 1.4).astype("float32")
counts = np.bincount(targets.astype(int))
weight_for_0, weight_for_1 = 1.0 / counts[0], 1.0 / counts[1]

model = keras.Sequential(
    [
        keras.Input(shape=(12,)),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(1, activation="sigmoid"),
    ]
)
metrics = [
    keras.metrics.FalseNegatives(name="fn"),
    keras.metrics.Precision(name="precision"),
    keras.metrics.Recall(name="recall"),
]
model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy", metrics=metrics)
model.fit(
    features,
    targets,
    batch_size=args.batch_size,
    epochs=args.epochs,
    class_weight={0: weight_for_0, 1: weight_for_1},
    shuffle=False,
    verbose=2,
)

sample_weight = np.where(targets > 0, 5.0, 1.0).astype("float32")
second = keras.Sequential([keras.Input(shape=(12,)), keras.layers.Dense(1, activation="sigmoid")])
second.compile(optimizer="sgd", loss="binary_crossentropy", metrics=["accuracy"])
second.fit(
    features,
    targets,
    sample_weight=sample_weight,
    batch_size=args.batch_size,
    epochs=args.epochs,
    validation_split=0.2,
    shuffle=False,
    verbose=2,
)

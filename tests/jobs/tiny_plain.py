"""A plain Keras script with no trace of the plugin (the zero-change form).
Writes this rank's final weights to OUT/TAG-rank<r>.json."""

import json
import os
import sys

import keras
import numpy as np

out, tag, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
rank = int(os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", 0)))
rng = np.random.default_rng(0)
x = rng.normal(size=(203, 6)).astype("float32")
y = (x.sum(axis=1, keepdims=True) > 0).astype("float32")
keras.utils.set_random_seed(11)
model = keras.Sequential(
    [
        keras.Input((6,)),
        keras.layers.Dense(8, activation="relu"),
        keras.layers.Dense(1, activation="sigmoid"),
    ]
)
model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
history = model.fit(x, y, batch_size=batch, epochs=2, verbose=0)
weights = np.concatenate([v.numpy().ravel() for v in model.trainable_variables])
with open(os.path.join(out, f"{tag}-rank{rank}.json"), "w") as f:
    json.dump({"weights": weights.tolist(), "history": history.history}, f)

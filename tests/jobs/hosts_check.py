"""tiny_plain.py's training, with what a multi-node job must get right:
each rank records its host and place on it; a CSV log and a saved model go
to the shared directory OUT (rank 0 writes them). Writes OUT/TAG-rank<r>.json.

    mpiexec ... python -m transparent_dist hosts_check.py OUT TAG BATCH
"""

import json
import os
import socket
import sys

import keras
import numpy as np

import transparent_dist

out, tag, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
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
log = keras.callbacks.CSVLogger(os.path.join(out, "log.csv"))
model.fit(x, y, batch_size=batch, epochs=2, verbose=0, callbacks=[log])
model.save(os.path.join(out, "model.keras"))
weights = np.concatenate([v.numpy().ravel() for v in model.trainable_variables])
record = {
    "host": socket.gethostname(),
    "local": [transparent_dist.local_rank(), transparent_dist.local_size()],
    "weights": weights.tolist(),
}
with open(os.path.join(out, f"{tag}-rank{transparent_dist.rank()}.json"), "w") as f:
    json.dump(record, f)

"""A Keras 2 script (TF_USE_LEGACY_KERAS=1: `tf.keras` is tf_keras).

    TF_USE_LEGACY_KERAS=1 mpiexec -n N python -m transparent_dist tf_keras_fit.py OUT plugin
    TF_USE_LEGACY_KERAS=1 python tf_keras_fit.py OUT reference N   # batch N*b
    TF_USE_LEGACY_KERAS=1 mpiexec -n N python tf_keras_fit.py OUT control
Writes OUT/<mode>-rank<r>.json.
"""

import json
import os
import sys

import numpy as np
import tensorflow as tf

out, mode = sys.argv[1], sys.argv[2]
rank = int(os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", 0)))
ranks = (
    int(sys.argv[3])
    if mode == "reference"
    else int(os.environ.get("PMI_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE", 1)))
)
keras = tf.keras
assert keras.__name__.startswith("tf_keras"), keras.__name__
batch = 16 * (ranks if mode == "reference" else 1)
rng = np.random.default_rng(0)
x = rng.normal(size=(300, 6)).astype("float32")
y = (x.sum(axis=1, keepdims=True) > 0).astype("float32")
result = {}


def build(seed, optimizer):
    tf.keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.layers.Dense(8, activation="relu", input_shape=(6,)),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model.compile(optimizer=optimizer, loss="binary_crossentropy", metrics=["accuracy"])
    return model


def weights(model):
    return np.concatenate([v.numpy().ravel() for v in model.trainable_variables]).tolist()


# Same data everywhere: N ranks x b against one process x N*b.
model = build(1, keras.optimizers.Adam(0.01))
history = model.fit(
    x,
    y,
    batch_size=batch,
    epochs=2,
    shuffle=False,
    verbose=0,
    validation_split=0.2,
    callbacks=[keras.callbacks.CSVLogger(os.path.join(out, f"{mode}.csv"))],
)
result["same"] = {
    "weights": weights(model),
    "history": history.history,
    "evaluate": model.evaluate(x, y, batch_size=batch, verbose=0),
    "predict": model.predict(x[:37], batch_size=batch, verbose=0).ravel().tolist(),
}
model.save_weights(os.path.join(out, f"{mode}-rank{rank}.weights.h5"))

# Each rank its own start (seeded by rank) and legacy optimizer: equal at the end.
model = build(50 + rank, keras.optimizers.legacy.SGD(0.1, momentum=0.9))
model.fit(x, y, batch_size=batch, epochs=1, verbose=0)
result["own_start"] = {"weights": weights(model)}


# Rank-dependent seeds and shuffle=True: the ranks must still agree on one
# permutation, or samples would be dropped and repeated.
class SeenIds(keras.metrics.Metric):
    def __init__(self):
        super().__init__(name="seen")
        self.counts = self.add_weight(name="counts", shape=(300,), initializer="zeros")

    def update_state(self, y_true, y_pred, sample_weight=None):
        ids = tf.cast(y_true[:, 1], "int32")
        self.counts.assign_add(tf.math.bincount(ids, minlength=300, maxlength=300, dtype="float32"))

    def result(self):
        return tf.reduce_max(self.counts)


tf.keras.utils.set_random_seed(70 + rank)
seen = SeenIds()
model = keras.Sequential([keras.layers.Dense(1, input_shape=(6,))])
model.compile(
    optimizer="sgd", loss=lambda t, p: tf.reduce_mean(tf.square(t[:, :1] - p)), metrics=[seen]
)
labelled = np.concatenate([y, np.arange(300, dtype="float32")[:, None]], axis=1)
history = model.fit(x, labelled, batch_size=batch, epochs=1, shuffle=True, verbose=0)
counts = seen.counts.numpy()
result["shuffled_ids"] = {
    "ids": np.flatnonzero(counts).tolist(),
    "max": float(counts.max()),
    "global_max": float(history.history["seen"][-1]),
}

# Rows on disk (h5py), as a tf_keras script passes them: the same training as
# arrays of one process with the global batch (only the plugin reads files).
model = build(2, keras.optimizers.Adam(0.01))
if mode == "plugin":
    import h5py

    with h5py.File(os.path.join(out, f"data-rank{rank}.h5"), "w") as f:
        f["x"], f["y"] = x, y
    data = h5py.File(os.path.join(out, f"data-rank{rank}.h5"), "r")
    model.fit(data["x"], data["y"], batch_size=batch, epochs=2, shuffle=False, verbose=0)
else:
    model.fit(x, y, batch_size=batch, epochs=2, shuffle=False, verbose=0)
result["rows_on_disk"] = {"weights": weights(model)}
with open(os.path.join(out, f"{mode}-rank{rank}.json"), "w") as f:
    json.dump(result, f)

"""Keras's own BackupAndRestore and fit(initial_epoch=...) under the plugin.

    mpiexec -n 2 python -m transparent_dist backup_restore.py OUT PHASE
PHASE 1 stops with an exception in epoch 3 (after two backed-up epochs);
PHASE 2 runs the same fit again, which restores and finishes; PHASE 3 calls
fit(initial_epoch=2, epochs=4).
"""

import json
import os
import sys

import keras
import numpy as np

import transparent_dist

out, phase = sys.argv[1], sys.argv[2]
rank = transparent_dist.rank()
rng = np.random.default_rng(0)
x = rng.normal(size=(256, 4)).astype("float32")
y = x.sum(axis=1, keepdims=True)
keras.utils.set_random_seed(1)
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
model.compile(optimizer="sgd", loss="mse")


class Interrupt(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 2:
            raise KeyboardInterrupt  # stands in for a crash, on every rank alike


class Epochs(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.seen = []

    def on_epoch_begin(self, epoch, logs=None):
        self.seen.append(epoch)


epochs = Epochs()
backup = keras.callbacks.BackupAndRestore(os.path.join(out, "backup"))
result = {}
if phase == "1":
    try:
        model.fit(x, y, epochs=4, verbose=0, callbacks=[backup, epochs, Interrupt()])
    except KeyboardInterrupt:
        result["interrupted_after"] = epochs.seen
elif phase == "2":
    model.fit(x, y, epochs=4, verbose=0, callbacks=[backup, epochs])
    result["epochs_run"] = epochs.seen
else:
    history = model.fit(x, y, initial_epoch=2, epochs=4, verbose=0, callbacks=[epochs])
    result["epochs_run"] = epochs.seen
    result["history"] = len(history.history["loss"])
result["weights"] = np.concatenate([v.numpy().ravel() for v in model.trainable_variables]).tolist()
result["backup_exists"] = os.path.exists(os.path.join(out, "backup"))
with open(os.path.join(out, f"phase{phase}-rank{rank}.json"), "w") as f:
    json.dump(result, f)

"""A plain training script, made slow enough to be interrupted mid-epoch.
Writes its pid to OUT/pid-rank<r>, its progress to OUT/progress-rank<r>, and
its final weights to OUT/<tag>-rank<r>.json.

    [TD_CHECKPOINT_DIR=...] mpiexec -n 2 python -m transparent_dist preemptible.py OUT TAG

With SLOW_WRITE=1, rank 0's second checkpoint write stalls half-way (after
writing OUT/writing) so that the test can kill it there. BATCH (16) is the
batch_size argument; DROPOUT=0 leaves dropout out (its masks are drawn per
rank, so runs at different rank counts differ); AFTER_FIT=1 writes
OUT/fit-done-rank<r> and waits 60 s once fit has returned (a script's next
phase).
"""

import json
import os
import sys
import time

import keras
import numpy as np

import transparent_dist

out, tag = sys.argv[1], sys.argv[2]
rank = transparent_dist.rank()
with open(os.path.join(out, f"pid-rank{rank}"), "w") as f:
    f.write(str(os.getpid()))

if os.environ.get("SLOW_WRITE"):
    from transparent_dist.core import checkpoint

    original, calls = checkpoint._write_payload, []

    def slow_write(directory, arrays, meta):
        calls.append(1)
        if len(calls) == 2:
            with open(os.path.join(directory, "arrays.npz"), "wb") as f:
                f.write(b"half a checkpoint")
            open(os.path.join(out, "writing"), "w").close()
            time.sleep(600)
        original(directory, arrays, meta)

    checkpoint._write_payload = slow_write


STEP_SECONDS = float(os.environ.get("STEP_SECONDS", "0"))


class Progress(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        with open(os.path.join(out, f"progress-rank{rank}"), "a") as f:
            f.write(f"{batch}\n")
        # Slow only where a test interrupts the run (so the signal lands
        # mid-epoch); a run to compare with goes at full speed.
        time.sleep(STEP_SECONDS)


rng = np.random.default_rng(0)
x = rng.normal(size=(960, 8)).astype("float32")
y = (x @ rng.normal(size=(8, 1))).astype("float32")
keras.utils.set_random_seed(3)
model = keras.Sequential(
    [
        keras.Input((8,)),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dropout(float(os.environ.get("DROPOUT", "0.1"))),
        keras.layers.Dense(1),
    ]
)
model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
history = model.fit(
    x,
    y,
    batch_size=int(os.environ.get("BATCH", "16")),
    epochs=3,
    shuffle=False,
    verbose=0,
    callbacks=[Progress(), keras.callbacks.EarlyStopping(monitor="loss", patience=5)],
)
weights = np.concatenate([v.numpy().ravel() for v in model.trainable_variables])
with open(os.path.join(out, f"{tag}-rank{rank}.json"), "w") as f:
    json.dump({"weights": weights.tolist(), "epochs": len(history.history["loss"])}, f)
if os.environ.get("AFTER_FIT"):
    open(os.path.join(out, f"fit-done-rank{rank}"), "w").close()
    time.sleep(60)

"""A script that the batch system signals at awkward moments.

    TD_CHECKPOINT_DIR=... mpiexec -n 2 python -m transparent_dist late_signals.py OUT

Writes OUT/pid-rank<r>; OUT/in-fit once the second epoch runs (each step
then sleeps a little, so signals land mid-fit); OUT/fit-done once fit has
returned, then spends 3 s on "exports" before writing OUT/export-rank0.txt
(rank 0, as scripts do). SLOW_STEPS=0: no sleeps in the steps (for a signal
that comes after fit).
"""

import os
import sys
import time

import keras
import numpy as np

import transparent_dist

out = sys.argv[1]
rank = transparent_dist.rank()
with open(os.path.join(out, f"pid-rank{rank}"), "w") as f:
    f.write(str(os.getpid()))


class Slow(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if self.epoch >= 1 and os.environ.get("SLOW_STEPS", "1") != "0":
            if rank == 0 and batch == 1:
                open(os.path.join(out, "in-fit"), "w").close()
            time.sleep(0.2)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch


rng = np.random.default_rng(1)
x = rng.normal(size=(640, 8)).astype("float32")
y = x.sum(axis=1, keepdims=True)
model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])
model.compile(optimizer="sgd", loss="mse")
model.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[Slow()])
if rank == 0:
    open(os.path.join(out, "fit-done"), "w").close()
time.sleep(3)
loss = float(model.evaluate(x, y, verbose=0))
if rank == 0:
    with open(os.path.join(out, "export-rank0.txt"), "w") as f:
        f.write(f"{loss:.6f}\n")

"""One failure at a time, on rank 1 of a small training job.

    mpiexec -n 2 python -m transparent_dist faults.py MODE
MODE: raise_before_fit, raise_in_callback, sigkill, mismatched_model, stall, none
"""

import os
import signal
import sys
import time

import keras
import numpy as np

import transparent_dist

mode, rank = sys.argv[1], transparent_dist.rank()
if mode == "raise_before_fit" and rank == 1:
    raise RuntimeError("rank 1 could not find its input")


class Fault(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if rank != 1 or batch != 3:
            return
        if mode == "raise_in_callback":
            raise ValueError("bad value in a callback")
        if mode == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "stall":
            time.sleep(6)


x = np.random.default_rng(0).normal(size=(640, 8)).astype("float32")
y = x.sum(axis=1)
width = 17 if (mode == "mismatched_model" and rank == 1) else 16
model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(width), keras.layers.Dense(1)])
model.compile(optimizer="sgd", loss="mse")
model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[Fault()])
print("finished")

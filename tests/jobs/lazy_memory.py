"""Trains on an HDF5 dataset larger than this rank may hold, and reports the
growth of the peak resident memory during fit.

    mpiexec -n N python -m transparent_dist lazy_memory.py FILE OUT
"""

import json
import os
import sys

import h5py
import keras

import transparent_dist


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) * 1024


keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(4), keras.layers.Dense(1)])
model.compile(optimizer="sgd", loss="mse")
with h5py.File(sys.argv[1], "r") as f:
    model.fit(f["x"][:1024], f["y"][:1024], batch_size=512, epochs=1, verbose=0)  # warm up
    before = peak_rss()
    history = model.fit(f["x"], f["y"], batch_size=8192, epochs=1, verbose=0)
    after = peak_rss()
    file_bytes = f["x"].nbytes + f["y"].nbytes
with open(os.path.join(sys.argv[2], f"memory-rank{transparent_dist.rank()}.json"), "w") as out:
    json.dump(
        {"growth": after - before, "file_bytes": file_bytes, "loss": history.history["loss"][0]},
        out,
    )

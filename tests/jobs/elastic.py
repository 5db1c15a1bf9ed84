"""A rank lost mid-epoch under an MPI with ULFM: the survivors go on.

    mpiexec --with-ft ulfm -n 3 python -m transparent_dist elastic.py MODE OUT
MODE: none (the uninterrupted run; in one process too), kill2 (rank 2
SIGKILLs itself as step 4 of epoch 2 begins). Rank 0 (the lowest survivor)
writes the final weights to OUT.npz and the History to OUT.json.
"""

import json
import os
import signal
import sys

import keras
import numpy as np

import transparent_dist

mode, out = sys.argv[1], sys.argv[2]
rank = transparent_dist.rank()
keras.utils.set_random_seed(1)


class Kill(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (mode, rank, self.epoch, batch) == (
            "kill2",
            2,
            1,
            4,
        ) or mode == f"kill{rank}:{self.epoch}:{batch}":
            os.kill(os.getpid(), signal.SIGKILL)


x = np.random.default_rng(0).normal(size=(432, 8)).astype("float32")
y = x @ np.linspace(-1, 1, 8).astype("float32")
model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16), keras.layers.Dense(1)])
model.compile(keras.optimizers.Adam(1e-2), "mse")
# A global batch of 72: 24 per rank on 3 ranks, all of it in one process.
batch = 72 // transparent_dist.size()
history = model.fit(x, y, batch_size=batch, epochs=3, shuffle=False, verbose=0, callbacks=[Kill()])
if transparent_dist.rank() == 0:
    np.savez(out + ".npz", *model.get_weights())
    with open(out + ".json", "w") as f:
        json.dump(history.history, f)
print(f"rank {rank} finished", flush=True)

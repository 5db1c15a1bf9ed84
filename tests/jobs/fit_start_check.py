"""Fits whose start and end lines tests/test_fit_start.py reads from rank 0's
standard error, in one job:

    CXX=fake_cxx TD_CACHE_DIR=fresh mpiexec -n 2 python fit_start_check.py

1. arrays, batch 64, TD_BATCH_SIZE=per_rank; its first step builds the
   native op (`CXX` is a stand-in compiler that takes a known time);
2. the same fit again (the start line is not repeated; no build);
3. arrays, batch 64, TD_BATCH_SIZE=global;
4. a generator without steps_per_epoch (steps unknown);
5. a dataset batched by 32 (its batch size told from the dataset).
Each fit is preceded by a "--- fit N" line on standard error, and the
first followed by "--- fit 1 took S s" (its wall time, build included).
"""

import sys
import time

import keras
import numpy as np
import tensorflow as tf

import transparent_dist


def mark(n: int) -> None:
    if transparent_dist.rank() == 0:
        print(f"--- fit {n}", file=sys.stderr, flush=True)


rng = np.random.default_rng(0)
x = rng.normal(size=(640, 8)).astype("float32")
y = (x.sum(1) > 0).astype("float32")
model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4), keras.layers.Dense(1)])
model.compile("sgd", "mse")

mark(1)
start = time.perf_counter()
model.fit(x, y, batch_size=64, epochs=2, verbose=0)
if transparent_dist.rank() == 0:
    print(f"--- fit 1 took {time.perf_counter() - start:.3f} s", file=sys.stderr, flush=True)
mark(2)
model.fit(x, y, batch_size=64, epochs=2, verbose=0)
mark(3)
transparent_dist.configure(batch_size="global")
model.fit(x, y, batch_size=64, epochs=1, verbose=0)
transparent_dist.configure(batch_size="per_rank")


def batches():
    for start in range(0, 640, 32):
        yield x[start : start + 32], y[start : start + 32]


mark(4)
model.fit(batches(), epochs=1, verbose=0)
mark(5)
model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(32).prefetch(2), epochs=1, verbose=0)
mark(6)

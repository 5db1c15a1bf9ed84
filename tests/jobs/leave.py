"""A training script one of whose ranks leaves early, the ways scripts do.

LEAVE_HOW: exit0 | exit3 | os_exit | finalize | raise; LEAVE_WHERE: loop (a
custom GradientTape loop), before (fit), step (inside fit, from a callback),
between (two fits), predict,
end (after the last call; every rank then writes RESULTS/rank<r>.txt).
LEAVE_RANK: the rank that leaves (-1: every rank, for the end case).
"""

import logging
import os
import sys

import keras
import numpy as np

import transparent_dist

how = os.environ["LEAVE_HOW"]
where = os.environ["LEAVE_WHERE"]
leaver = int(os.environ.get("LEAVE_RANK", "1"))
rank = transparent_dist.rank()
results = os.environ.get("RESULTS", "")
# As CosmoFlow-style scripts log: INFO progress lines, and warnings.
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
logging.info(f"Initialized rank {rank}")
logging.warning(f"rank {rank} warns")


def leave() -> None:
    if leaver not in (-1, rank):
        return
    if how == "exit0":
        sys.exit(0)
    if how == "exit3":
        sys.exit(3)
    if how == "os_exit":
        os._exit(0)
    if how == "finalize":
        from mpi4py import MPI

        MPI.Finalize()
        if results:  # what a script writes after finalizing MPI itself
            with open(os.path.join(results, f"rank{rank}.txt"), "w") as f:
                f.write("written after MPI.Finalize\n")
        return
    raise RuntimeError(f"rank {rank} gives up")


class LeaveInStep(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if where == "step" and batch == 3:
            leave()


rng = np.random.default_rng(0)
x = rng.normal(size=(192, 8)).astype("float32")
y = x.sum(axis=1, keepdims=True)
model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4), keras.layers.Dense(1)])
model.compile(optimizer="sgd", loss="mse")
if where == "loop":  # a custom GradientTape loop, before any fit
    import tensorflow as tf

    for step in range(8):
        with tf.GradientTape() as tape:
            loss = keras.ops.mean((model(x[:16]) - y[:16]) ** 2)
        grads = tape.gradient(loss, model.trainable_variables)
        model.optimizer.apply(grads, model.trainable_variables)
        if step == 3:
            leave()
if where == "before":
    leave()
callbacks = [LeaveInStep()]
if results:  # the TensorBoard callback works as installed (rank 0 writes)
    callbacks.append(keras.callbacks.TensorBoard(log_dir=os.path.join(results, "tb")))
model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=callbacks)
if where == "between":
    leave()
model.fit(x, y, batch_size=16, epochs=1, verbose=0)
if where == "predict":
    leave()
model.predict(x, verbose=0)
if where == "end":
    leave()

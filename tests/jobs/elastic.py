"""Ranks lost mid-epoch under an MPI with ULFM: the survivors go on.

    mpiexec --with-ft ulfm -n 3 python -m transparent_dist elastic.py MODE OUT
MODE: none (the uninterrupted run; in one process too), or kills separated
by commas, RANK:EPOCH:STEP each (that rank, numbered as the job started,
SIGKILLs itself as that step of that epoch begins, both 0-based; vSTEP: as
that step of the epoch's validation begins). Rank 0 at the end (the lowest
survivor) writes the final weights to OUT.npz, the History to OUT.json, the
weights of the newest ModelCheckpoint file (OUT-ckpt-EPOCH.weights.h5) to
OUT-newest.npz and, in OUT-times.json, when each step ended and when each
rank was killed. The script's CSVLogger writes OUT.csv, its
BackupAndRestore OUT-backup/ (kept at the end). With ELASTIC_DATA=dataset
the training data is a tf.data dataset the script batches itself (430 rows
in 18 batches of 24 on 3 ranks, the last of 22, filtered, so of unknown
length; in 6 of 72 in one process);
with ELASTIC_DATA=endless the same 432 rows as the arrays, batched and
repeated, read `steps_per_epoch` batches an epoch (the same global batches
as the arrays: the same numbers). Every rank notes the samples each of
its training steps took in OUT-ledgerRANK, a line per step: the ranks
then, the epoch, the step, the samples' ids (the model's first layer takes
the id column off the inputs).
"""

import glob
import json
import os
import signal
import sys
import time

import numpy as np
import tensorflow as tf

if os.environ.get("TF_USE_LEGACY_KERAS") == "1":  # the same script in tf_keras (Keras 2)
    import tf_keras as keras
else:
    import keras

import transparent_dist

mode, out = sys.argv[1], sys.argv[2]
rank = transparent_dist.rank()
kills = {tuple(k.split(":")) for k in mode.split(",") if k != "none"}
kills = {(int(r), int(e), s) for r, e, s in kills}
keras.utils.set_random_seed(1)


class Kill(keras.callbacks.Callback):
    ended: list = []

    def _kill(self, step):
        if (rank, self.epoch, step) in kills:
            with open(f"{out}-killed{rank}", "w") as f:
                f.write(str(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        self._kill(str(batch))
        Kill.at = (self.epoch, batch)

    def on_test_batch_begin(self, batch, logs=None):
        self._kill(f"v{batch}")

    def on_train_batch_end(self, batch, logs=None):
        self.ended.append((self.epoch, batch, time.time()))


def _note(ids):
    epoch, step = Kill.at
    with open(f"{out}-ledger{rank}", "a") as f:
        taken = ",".join(str(int(i)) for i in ids.numpy())
        f.write(f"{transparent_dist.size()} {epoch} {step} {taken}\n")


class Ledger(keras.layers.Layer):
    """Takes the id column (the first) off the inputs; in training, notes
    the ids each step takes (`_note`)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_jit = False  # a py_function

    def call(self, inputs, training=None):
        if training:
            tf.py_function(_note, [inputs[:, 0]], [])
        return inputs[:, 1:]


data = np.random.default_rng(0).normal(size=(576, 8)).astype("float32")
y, vy = (d @ np.linspace(-1, 1, 8).astype("float32") for d in (data[:432], data[432:]))
data = np.c_[np.arange(576, dtype="float32"), data]
x, vx = data[:432], data[432:]
model = keras.Sequential(
    [keras.Input((9,)), Ledger(), keras.layers.Dense(16), keras.layers.Dense(1)]
)
model.compile(keras.optimizers.Adam(1e-2), "mse")
# A global batch of 72: 24 per rank on 3 ranks, all of it in one process.
batch = 72 // transparent_dist.size()
callbacks = [
    Kill(),
    keras.callbacks.CSVLogger(out + ".csv"),
    keras.callbacks.ModelCheckpoint(out + "-ckpt-{epoch}.weights.h5", save_weights_only=True),
    keras.callbacks.BackupAndRestore(out + "-backup", delete_checkpoint=False),
]
inputs = {"x": x, "y": y, "batch_size": batch}
if os.environ.get("ELASTIC_DATA") == "dataset":
    rows = tf.data.Dataset.from_tensor_slices((x[:430], y[:430]))
    if transparent_dist.size() > 1:
        # Of unknown length, as a TFRecord file's or a filtered dataset's
        # (not in the one-process reference: Keras alone makes one more step
        # call at such an epoch's end, which moves Adam's step counter).
        rows = rows.filter(lambda *_: True)
    inputs = {"x": rows.batch(batch)}
elif os.environ.get("ELASTIC_DATA") == "endless":
    endless = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).repeat()
    inputs = {"x": endless, "steps_per_epoch": len(x) // batch}
history = model.fit(
    **inputs,
    epochs=3,
    shuffle=False,
    verbose=0,
    validation_data=(vx, vy),
    callbacks=callbacks,
)
if transparent_dist.rank() == 0:
    np.savez(out + ".npz", *model.get_weights())
    with open(out + ".json", "w") as f:
        json.dump(history.history, f)
    with open(out + "-times.json", "w") as f:
        json.dump({"ended": Kill.ended}, f)
    newest = max(glob.glob(out + "-ckpt-*.weights.h5"), key=os.path.getmtime)
    model.load_weights(newest)
    np.savez(out + "-newest.npz", *model.get_weights())
print(f"rank {rank} finished", flush=True)

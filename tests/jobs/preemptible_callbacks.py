"""A training script with every stateful Keras callback at once, run
uninterrupted, then with checkpoints, SIGTERMs and resumes: the callbacks
must end as in the uninterrupted run.

    mpiexec -n 2 python -m transparent_dist preemptible_callbacks.py OUT first
    mpiexec -n 3 python -m transparent_dist preemptible_callbacks.py OUT resume

`first` trains the reference (no checkpoints) into OUT/ref, then the same
fit with TD_CHECKPOINT_DIR into OUT/run; `resume` runs that fit again. In
either, with KILL_AT, every rank sends itself SIGTERM once the optimizer has
made that many steps (the run's global step): a number, `random:SEED` (a
step before the epoch in which EarlyStopping stopped the reference, drawn
with SEED and written to OUT/kill_at), or `stop` (the last step of that
epoch); it then exits with 75. A finished fit writes OUT/<ref|run>-rank<r>.json:
final weights, history, learning rate, EarlyStopping's numbers and, on rank
0, the CSV log. ModelCheckpoint writes OUT/ref/ckpt-NN.keras for the
reference, and into TD_CHECKPOINT_DIR itself for the run.

With one global batch (TD_BATCH_SIZE=global) and no dropout, the numbers do
not depend on the rank count.
"""

import json
import os
import random
import signal
import sys

import keras
import numpy as np

import transparent_dist

out, phase = sys.argv[1], sys.argv[2]
rank = transparent_dist.rank()
checkpoint_dir = os.environ["TD_CHECKPOINT_DIR"]
EPOCHS, BATCH, STEPS = 12, 48, 3

# Noisy targets: the validation loss improves, then stalls. ReduceLROnPlateau
# lowers the rate four times, EarlyStopping stops after 9 of 12 epochs and
# restores epoch 6's weights, ModelCheckpoint writes five files.
rng = np.random.default_rng(7)
w = rng.normal(size=(8, 1))
x = rng.normal(size=(STEPS * BATCH, 8)).astype("float32")
y = (x @ w + 1.5 * rng.normal(size=(STEPS * BATCH, 1))).astype("float32")
vx = rng.normal(size=(96, 8)).astype("float32")
vy = (vx @ w + 1.5 * rng.normal(size=(96, 1))).astype("float32")


class StepCounter(keras.callbacks.Callback):
    """A script's own stateful callback (the plugin cannot save it), and the
    SIGTERM at a chosen global step."""

    def __init__(self, kill_at=None):
        super().__init__()
        self.kill_at, self.seen = kill_at, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if int(self.model.optimizer.iterations.numpy()) == self.kill_at:
            os.kill(os.getpid(), signal.SIGTERM)


def fit(tag, kill_at=None):
    where = os.path.join(out, tag)
    os.makedirs(where, exist_ok=True)
    saves = checkpoint_dir if tag == "run" else where
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu", name="hidden"),
            keras.layers.Dense(1, name="out"),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.1), loss="mse")
    early = keras.callbacks.EarlyStopping(monitor="val_loss", patience=3, restore_best_weights=True)
    callbacks = [
        StepCounter(kill_at),
        early,
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=1),
        keras.callbacks.ModelCheckpoint(
            os.path.join(saves, "ckpt-{epoch:02d}.keras"), monitor="val_loss", save_best_only=True
        ),
        keras.callbacks.LearningRateScheduler(lambda epoch, lr: lr * 0.9),
        keras.callbacks.CSVLogger(os.path.join(where, "log.csv"), append=True),
        keras.callbacks.BackupAndRestore(os.path.join(where, "backup"), save_freq=2),
        keras.callbacks.TerminateOnNaN(),
    ]
    history = model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=EPOCHS,
        shuffle=False,
        verbose=0,
        validation_data=(vx, vy),
        callbacks=callbacks,
    )
    result = {
        "weights": np.concatenate([v.numpy().ravel() for v in model.trainable_variables]).tolist(),
        "history": history.history,
        "epoch": history.epoch,
        "learning_rate": float(model.optimizer.learning_rate.numpy()),
        "stopped_epoch": early.stopped_epoch,
        "best_epoch": early.best_epoch,
        "backup_left": os.path.exists(os.path.join(where, "backup")),
    }
    if rank == 0:
        with open(os.path.join(where, "log.csv")) as f:
            result["csv"] = f.read()
    with open(os.path.join(out, f"{tag}-rank{rank}.json"), "w") as f:
        json.dump(result, f)
    return result


def kill_at(reference):
    chosen = os.environ.get("KILL_AT")
    if chosen is None:
        return None
    stopped = reference["stopped_epoch"]
    if chosen == "stop":
        chosen = (stopped + 1) * STEPS
    elif chosen.startswith("random:"):
        chosen = random.Random(int(chosen.split(":")[1])).randint(1, stopped * STEPS - 1)
    if rank == 0:
        with open(os.path.join(out, "kill_at"), "w") as f:
            f.write(str(chosen))
    return int(chosen)


if phase == "first":
    transparent_dist.configure(checkpoint_dir="")
    reference = fit("ref")
    transparent_dist.configure(checkpoint_dir=checkpoint_dir)
else:
    with open(os.path.join(out, "ref-rank0.json")) as f:
        reference = json.load(f)
fit("run", kill_at(reference))

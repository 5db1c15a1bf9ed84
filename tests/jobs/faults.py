"""One fault at a time, in a small training job written as users write them.

    mpiexec -n 2 python -m transparent_dist faults.py MODE
MODE: raise_before_fit, raise_in_callback, sigkill, mismatched_model, stall,
fit_twice, evaluate_vs_fit, steps_on_one_rank, stop_one_rank, sigint, sigterm,
stop_rank0, sleep_long, adamw_on_one_rank, loss_on_one_rank, none, or
`disagreements`: the calls that differ between ranks (DIFFERING), one after
the other in one job, each error caught and written to
FAULT_OUT-caught<rank>.json, the plugin reset between them.
With FAULT_OUT set, each rank writes its pid to FAULT_OUT-pid<rank>.
"""

import json
import os
import signal
import sys
import time

import keras
import numpy as np

import transparent_dist

mode, rank = sys.argv[1], transparent_dist.rank()
if os.environ.get("FAULT_OUT"):
    with open(os.environ["FAULT_OUT"] + f"-pid{rank}", "w") as f:
        f.write(str(os.getpid()))
if mode == "raise_before_fit" and rank == 1:
    raise RuntimeError("rank 1 could not find its input")


class Fault(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if mode == "stop_rank0" and rank == 0 and batch == 3:
            os.kill(os.getpid(), signal.SIGSTOP)
        if rank != 1 or batch != 3:
            return
        if mode == "raise_in_callback":
            raise ValueError("bad value in a callback")
        if mode == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "sigint":
            os.kill(os.getpid(), signal.SIGINT)
        if mode == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        if mode == "stall" and not getattr(self, "stalled", False):
            self.stalled = True  # once: a stall in the first epoch only
            time.sleep(5)
        if mode == "sleep_long":
            open(os.environ["FAULT_OUT"] + "-sleeping", "w").close()
            time.sleep(120)
        if mode == "stop_one_rank" and self.params["epochs"] == 4:
            # A time budget that runs out on one rank only, mid-epoch.
            self.model.stop_training = True


x = np.random.default_rng(0).normal(size=(640, 8)).astype("float32")
y = x.sum(axis=1)


def train(mode):
    width = 17 if (mode == "mismatched_model" and rank == 1) else 16
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(width), keras.layers.Dense(1)])
    optimizer = keras.optimizers.Adam(1e-3)
    if mode == "adamw_on_one_rank" and rank == 1:
        optimizer = keras.optimizers.AdamW(1e-3)  # the same variables as Adam
    loss = "mae" if (mode == "loss_on_one_rank" and rank == 1) else "mse"
    model.compile(optimizer=optimizer, loss=loss)
    if mode == "evaluate_vs_fit" and rank == 1:
        model.evaluate(x, y, batch_size=16, verbose=0)
    else:
        steps = 5 if (mode == "steps_on_one_rank" and rank == 0) else None
        model.fit(
            x, y, batch_size=16, epochs=2, verbose=0, callbacks=[Fault()], steps_per_epoch=steps
        )
    return model


DIFFERING = ["mismatched_model", "evaluate_vs_fit", "steps_on_one_rank", "adamw_on_one_rank"]
if mode == "disagreements":
    # Each is raised on every rank at once (CollectiveError), so a script
    # could catch it; deactivate/activate forgets the half-begun call.
    caught = {}
    for case in DIFFERING:
        try:
            train(case)
            caught[case] = None
        except ValueError as error:  # CollectiveError is one
            caught[case] = f"{type(error).__name__}: {error}"
        transparent_dist.deactivate()
        transparent_dist.activate()
    with open(os.environ["FAULT_OUT"] + f"-caught{rank}.json", "w") as f:
        json.dump(caught, f)
    model = train("none")  # and the job still trains
else:
    model = train(mode)
if mode == "fit_twice" and rank == 0:
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
if mode == "stop_one_rank":
    # EarlyStopping on rank-local numbers: rank 1 alone stops after epoch 1.
    class StopHere(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if rank == 1 and epoch == 0:
                self.model.stop_training = True

    first = model.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[StopHere()])
    second = model.fit(x, y, batch_size=16, epochs=4, verbose=0, callbacks=[Fault()])
    epochs = [len(h.history["loss"]) for h in (first, second)]
    with open(os.environ["FAULT_OUT"] + f"-rank{rank}", "w") as f:
        f.write(f"{epochs} {int(model.optimizer.iterations.numpy())}\n")
print("finished")

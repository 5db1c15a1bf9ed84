"""One timed training run for benchmarks/exchange_scaling.py (not run alone).

    python exchange_worker.py --model conv|mlp --mode plain|td|mwms [--steps N]

plain: Keras alone; td: under `python -m transparent_dist` (any number of
ranks); mwms: tf.distribute.MultiWorkerMirroredStrategy, TF_CONFIG set by
the caller. Prints one JSON line (rank / worker 0 only).
"""

import argparse
import json
import os
import time

import numpy as np

parser = argparse.ArgumentParser()
parser.add_argument("--model", choices=["conv", "mlp"], required=True)
parser.add_argument("--mode", choices=["plain", "td", "mwms"], required=True)
parser.add_argument("--steps", type=int, default=40)
parser.add_argument("--batch", type=int, default=32)
args = parser.parse_args()

import tensorflow as tf  # noqa: E402

if args.mode == "mwms":
    # Keras 3 does not run under MultiWorkerMirroredStrategy (its trainer
    # fails to convert PerReplica values): the peer runs the same models in
    # tf_keras (Keras 2), as a user of the peer would.
    import tf_keras as keras
else:
    import keras

strategy = None
rank, size = 0, 1
if args.mode == "mwms":
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    rank = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    size = strategy.num_replicas_in_sync
elif args.mode == "td":
    import transparent_dist

    rank, size = transparent_dist.rank(), transparent_dist.size()


def build():
    if args.model == "conv":
        layers = [
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10),
        ]
    else:
        layers = [
            keras.Input((1024,)),
            keras.layers.Dense(2048, activation="relu"),
            keras.layers.Dense(2048, activation="relu"),
            keras.layers.Dense(10),
        ]
    model = keras.Sequential(layers)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


shape = (32, 32, 3) if args.model == "conv" else (1024,)
samples = args.batch * args.steps  # per rank
rng = np.random.default_rng(rank)
keras.utils.set_random_seed(0)


class StepTimes(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1 and args.mode == "td":
            from transparent_dist import timeline

            timeline.reset()  # exchange counters for the warm epoch only

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._start)


timer = StepTimes()
if strategy is not None:
    with strategy.scope():
        model = build()
    x = rng.normal(size=(samples * size,) + shape).astype("float32")
    y = rng.integers(0, 10, size=samples * size)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(args.batch * size).repeat()
    model.fit(data, steps_per_epoch=args.steps, epochs=2, verbose=0, callbacks=[timer])
else:
    model = build()
    # Per-rank batch `batch`: the ranks together take `size` times the data.
    x = rng.normal(size=(samples * size,) + shape).astype("float32")
    y = rng.integers(0, 10, size=samples * size)
    model.fit(x, y, batch_size=args.batch, epochs=2, shuffle=False, verbose=0, callbacks=[timer])

step = float(np.median(timer.times[args.steps :]))  # the second epoch: warm
result = {
    "model": args.model,
    "mode": args.mode,
    "ranks": size,
    "step_ms": 1e3 * step,
    "batch_per_rank": args.batch,
    "params": int(model.count_params()),
}
if args.mode == "td" and size > 1:
    from mpi4py import MPI

    from transparent_dist import timeline, world

    stats = timeline.STATS  # the warm (second) epoch
    result["exchange_ms"] = 1e3 * stats.exchange_seconds / args.steps
    nbytes = int(stats.exchange_bytes / max(1, stats.exchanges))
    buffer = np.zeros(nbytes // 4, np.float32)
    comm = world.get().comm
    raw = []
    for _ in range(30):
        comm.Barrier()
        start = time.perf_counter()
        comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
        raw.append(time.perf_counter() - start)
    result["raw_allreduce_ms"] = 1e3 * float(np.median(raw[5:]))
    result["exchange_bytes"] = nbytes
if rank == 0:
    print("RESULT " + json.dumps(result), flush=True)

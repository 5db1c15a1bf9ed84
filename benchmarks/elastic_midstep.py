"""Why each optimizer update waits for the whole exchange under ULFM: a rank
lost in the middle of a step's exchange, with two designs.

    .venv-openmpi/bin/python benchmarks/elastic_midstep.py [--out docs/elastic_midstep]

3 ranks under `mpiexec --with-ft ulfm`, Keras 3, an MLP of 4 layers, a
bucket per gradient (TD_FUSION_MB=0.001). In step 14 rank 2 stops in its
backward pass just after the last layers' gradients exist (a stateless op
between the first and second layer: tf.function does not order it before
the exchange), waits 0.5 s while those buckets are exchanged, and SIGKILLs
itself; the survivors fail on the first layer's bucket. Two designs:
  whole update waits: today's (`Backend.after`: every op of the update,
      the step counter's included, after the whole exchange);
  counter only waits: each variable updated as soon as its own bucket is
      exchanged, only the counter's increment after the whole exchange.
Each job's final weights are compared with the uninterrupted run (one
process, the same global batch). Prints a table, writes OUT.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
MPIEXEC = str(Path(PYTHON).parent / "mpiexec")

SCRIPT = """
import contextlib, os, signal, sys, time
import keras, numpy as np, tensorflow as tf
import transparent_dist

design, out = sys.argv[1], sys.argv[2]
rank = transparent_dist.rank()
calls = [0]

def maybe_die(dy):
    calls[0] += 1
    if design != "none" and rank == 2 and calls[0] == 14:
        time.sleep(0.5)  # the buckets formed so far are exchanged meanwhile
        os.kill(os.getpid(), signal.SIGKILL)
    return dy

@tf.custom_gradient
def watch(x):
    def grad(dy):
        return tf.numpy_function(maybe_die, [dy], dy.dtype, stateful=False)
    return tf.identity(x), grad

class Watch(keras.layers.Layer):
    def call(self, x):
        return watch(x)

if design == "counter only waits":
    from keras.src.backend.common import variables
    from transparent_dist.tf.backend import TENSORFLOW

    @contextlib.contextmanager
    def counter_only(tensors):
        done = tf.group(*[t for t in tensors if t is not None])
        original = variables.Variable.assign_add
        def assign_add(self, value):
            if self.name != "iteration":
                return original(self, value)
            with tf.control_dependencies([done]):
                return original(self, value)
        variables.Variable.assign_add = assign_add
        try:
            yield
        finally:
            variables.Variable.assign_add = original

    object.__setattr__(TENSORFLOW, "after", counter_only)

keras.utils.set_random_seed(1)
x = np.random.default_rng(0).normal(size=(18 * 72, 8)).astype("float32")
y = x @ np.linspace(-1, 1, 8).astype("float32")
model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(64, "tanh"), Watch()]
                         + [keras.layers.Dense(64, "tanh") for _ in range(2)]
                         + [keras.layers.Dense(1)])
model.compile(keras.optimizers.Adam(1e-2), "mse")
model.fit(x, y, batch_size=72 // transparent_dist.size(), epochs=1, shuffle=False, verbose=0)
if transparent_dist.rank() == 0:
    np.savez(out, *model.get_weights())
"""

DESIGNS = ["whole update waits", "counter only waits"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TD_", "OMPI_", "PMIX_"))}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", TF_NUM_INTRAOP_THREADS="1", TD_FUSION_MB="0.001")
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env["PRTE_MCA_rmaps_default_mapping_policy"] = ":oversubscribe"
    env["PYTHONPATH"] = str(HERE.parent) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/elastic_midstep")
    args = parser.parse_args(argv)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "train.py")
        Path(script).write_text(SCRIPT)
        alone = os.path.join(tmp, "alone.npz")
        subprocess.run([PYTHON, script, "none", alone], env=_env(), check=True, capture_output=True)
        expected = np.load(alone)
        for design in DESIGNS:
            out = os.path.join(tmp, "job.npz")
            command = [MPIEXEC, "--with-ft", "ulfm", "-n", "3", PYTHON, "-m", "transparent_dist"]
            job = subprocess.run(
                [*command, script, design, out],
                env=_env(),
                capture_output=True,
                text=True,
                timeout=300,
            )
            said = [line for line in job.stderr.splitlines() if "lost rank" in line]
            got = np.load(out) if job.returncode == 0 else None
            rows[design] = {
                "exit": job.returncode,
                "said": said,
                "max_abs_diff": None
                if got is None
                else max(float(np.abs(got[k] - expected[k]).max()) for k in expected.files),
            }
            Path(out).unlink(missing_ok=True)
    print(f"{'':20} {'exit':>4} {'weights vs uninterrupted (max abs)':>36}")
    for design, row in rows.items():
        diff = "-" if row["max_abs_diff"] is None else f"{row['max_abs_diff']:.1e}"
        print(f"{design:20} {row['exit']:4} {diff:>36}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

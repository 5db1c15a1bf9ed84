"""Runs corpus scripts under each TD_STEPS setting in one job and records,
per run, fit's History, the steps each epoch ran and the models' weights.

    mpiexec -n N python -m transparent_dist step_counts_check.py OUT B SETTING:a.py,b.py ...

Each run sets `transparent_dist.configure(steps=SETTING)`, gets `--batch-size
B` and runs as `__main__` in OUT/SETTING/<script>/. Each rank writes
OUT/job-rank<r>.json:
{"SETTING/script": {"histories": [...], "epoch_steps": [[...]], "weights": {...}}}.
"""

import gc
import json
import os
import runpy
import sys
from pathlib import Path

import keras
import numpy as np

import transparent_dist

OUT, BATCH = Path(sys.argv[1]), sys.argv[2]
RANK = transparent_dist.rank()
RECORD: dict = {}


class EpochSteps(keras.callbacks.Callback):
    """The optimizer updates of each epoch (no batch hook: Keras keeps its
    asynchronous steps)."""

    def on_epoch_begin(self, epoch, logs=None):
        self.start = int(self.model.optimizer.iterations.numpy())

    def on_epoch_end(self, epoch, logs=None):
        done = int(self.model.optimizer.iterations.numpy()) - self.start
        RECORD["current"]["epoch_steps"][-1].append(done)


original_fit = keras.Model.fit


def fit(self, *args, **kwargs):
    RECORD["current"]["epoch_steps"].append([])
    kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), EpochSteps()]
    history = original_fit(self, *args, **kwargs)
    plain = {k: [float(v) for v in vs] for k, vs in history.history.items()}
    RECORD["current"]["histories"].append(plain)
    return history


keras.Model.fit = fit


def models(before):
    return {
        m.name: np.concatenate(
            [np.asarray(v.numpy(), np.float64).ravel() for v in m.trainable_variables]
        )
        .astype(float)
        .tolist()
        for m in (o for o in gc.get_objects() if isinstance(o, keras.Model))
        if id(m) not in before and m.built and m.trainable_variables
    }


results = {}
for group in sys.argv[3:]:
    setting, scripts = group.split(":")
    transparent_dist.configure(steps=setting)
    for script in scripts.split(","):
        path = Path(script).resolve()
        entry = {"histories": [], "epoch_steps": [], "weights": {}}
        RECORD["current"] = entry
        results[f"{setting}/{path.stem}"] = entry
        workdir = OUT / setting / path.stem
        workdir.mkdir(parents=True, exist_ok=True)
        keras.backend.clear_session()
        os.chdir(workdir)
        sys.argv = [str(path), "--batch-size", BATCH]
        gc.collect()
        before = {id(o) for o in gc.get_objects() if isinstance(o, keras.Model)}
        runpy.run_path(str(path), run_name="__main__")
        entry["weights"] = models(before)
        gc.collect()
(OUT / f"job-rank{RANK}.json").write_text(json.dumps(results))

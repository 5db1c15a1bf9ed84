"""A fit makes the gradient exchange ready before its first step is traced
(the native op's load is a collective and may compile), and its step sees
the typed facts of the call (`core.step_state`).

    mpiexec -n 2 python -m transparent_dist exchange_ready.py OUT
Writes OUT/ready-rank{r}.json.
"""

import json
import sys

import keras
import numpy as np
import tensorflow as tf

import transparent_dist
from transparent_dist.tf import native

try:
    from transparent_dist.core import step_state
except ImportError:  # the code before the typed state (the control run)
    step_state = None

seen = {}
original_load = native.load


def load():
    seen.setdefault("load_inside_trace", tf.inside_function())
    return original_load()


native.load = load


def loss(y_true, y_pred):
    if step_state is not None and "step" not in seen:
        state = step_state.current()
        seen["step"] = {
            "fitting": state.fitting,
            "own_train_step": state.own_train_step,
            "in_step": state.in_step,
            "samples_known": state.samples is not None,
        }
    return keras.losses.mean_squared_error(y_true, y_pred)


rng = np.random.default_rng(0)
x = rng.normal(size=(64, 4)).astype("float32")
y = rng.normal(size=(64, 1)).astype("float32")
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
model.compile(optimizer="sgd", loss=loss)
model.fit(x, y, batch_size=8, epochs=1, verbose=0)
if step_state is not None:
    seen["after_fit"] = step_state.current() == step_state.StepState()
path = f"{sys.argv[1]}/ready-rank{transparent_dist.rank()}.json"
with open(path, "w") as f:
    json.dump(seen, f)

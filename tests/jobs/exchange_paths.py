"""The same training with each gradient-exchange path: one fused buffer,
many small buckets, float16 and bfloat16 compression.

    mpiexec -n N python -m transparent_dist exchange_paths.py OUT
"""

import json
import os
import sys

import keras
import numpy as np

import transparent_dist

out = sys.argv[1]
rng = np.random.default_rng(0)
x = rng.normal(size=(512, 10)).astype("float32")
y = np.tanh(x @ rng.normal(size=(10, 1))).astype("float32")
result = {}
for name, settings in {
    "fused": {"fusion_mb": 64.0, "compression": "none"},
    "buckets": {"fusion_mb": 0.0005, "compression": "none"},  # one bucket per variable
    "fp16": {"fusion_mb": 64.0, "compression": "fp16"},
    "bf16": {"fusion_mb": 64.0, "compression": "bf16"},
}.items():
    transparent_dist.configure(**settings)
    keras.utils.set_random_seed(2)
    model = keras.Sequential(
        [
            keras.Input((10,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    history = model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    result[name] = {
        "weights": np.concatenate([v.numpy().ravel() for v in model.trainable_variables]).tolist(),
        "loss": history.history["loss"],
    }
with open(os.path.join(out, f"paths-rank{transparent_dist.rank()}.json"), "w") as f:
    json.dump(result, f)

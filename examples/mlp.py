"""An ordinary Keras 3 script: an MLP regression on generated data.

Runs unchanged on one process (`python examples/mlp.py`) or data-parallel:

    mpiexec -n 2 python -m transparent_dist examples/mlp.py --epochs 5
"""

import argparse

import keras
import numpy as np

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=5)
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--samples", type=int, default=20000)
parser.add_argument("--save", default=None, help="where to save the trained model")
args = parser.parse_args()

rng = np.random.default_rng(0)
x = rng.normal(size=(args.samples, 32)).astype("float32")
true_w = rng.normal(size=(32, 1)).astype("float32")
y = np.tanh(x @ true_w) + 0.05 * rng.normal(size=(args.samples, 1)).astype("float32")

model = keras.Sequential(
    [
        keras.Input((32,)),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(1),
    ]
)
model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse", metrics=["mae"])
history = model.fit(
    x, y, batch_size=args.batch_size, epochs=args.epochs, validation_split=0.1, verbose=2
)
loss, mae = model.evaluate(x, y, batch_size=256, verbose=0)
print(f"final: loss={loss:.4f} mae={mae:.4f}")
if args.save:
    model.save(args.save)

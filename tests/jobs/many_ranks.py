"""Many ranks on a small machine: train, write the weights, then one rank
fails mid-training (one job per rank count serves both tests).

    mpiexec -n N python -m transparent_dist many_ranks.py OUT plugin
    python many_ranks.py OUT reference          # plain Keras, the global batch

The global batch is 64 at every N (per-rank batch 64 / N), so one reference
serves every rank count. 300 rows: the last batch of each epoch, 44 rows,
splits unevenly over 8 and 16 ranks. One fit of 3 epochs: after the second,
each rank writes OUT/<mode>-N-rank<r>.json (its weights); in the third, rank
N - 3 raises at its second step, writing OUT/fault (the time) just before.
Each rank writes its pid to OUT/pid-<r>. Nothing here asserts:
tests/test_many_ranks.py compares.
"""

import json
import os
import sys
import time

import numpy as np

OUT, MODE = sys.argv[1], sys.argv[2]
if MODE == "plugin":
    import transparent_dist

    RANK, SIZE = transparent_dist.rank(), transparent_dist.size()
else:
    RANK, SIZE = 0, 1
with open(os.path.join(OUT, f"pid-{RANK}"), "w") as f:
    f.write(str(os.getpid()))
import keras  # noqa: E402

GLOBAL_B = 64
FAILING = SIZE - 3 if MODE == "plugin" else None
rng = np.random.default_rng(0)
X = rng.normal(size=(300, 8)).astype("float32")
Y = (X @ rng.normal(size=(8, 1)) + 0.1).astype("float32")


class WeightsThenFault(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            model = self.model
            weights = np.concatenate([v.numpy().ravel() for v in model.trainable_variables])
            result = {"weights": weights.tolist(), "steps": int(model.optimizer.iterations)}
            with open(os.path.join(OUT, f"{MODE}-{SIZE}-rank{RANK}.json"), "w") as f:
                json.dump(result, f)

    def on_train_batch_end(self, batch, logs=None):
        if self.epoch == 2 and batch == 1 and RANK == FAILING:
            with open(os.path.join(OUT, "fault"), "w") as f:
                f.write(repr(time.time()))
            raise RuntimeError(f"rank {RANK} lost its input")


keras.utils.set_random_seed(1)
model = keras.Sequential(
    [keras.Input((8,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(1)]
)
model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.5), loss="mse")
model.fit(
    X,
    Y,
    batch_size=GLOBAL_B // SIZE,
    epochs=3,
    shuffle=True,
    verbose=0,
    callbacks=[WeightsThenFault()],
)
print("finished")

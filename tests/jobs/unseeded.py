"""A script that seeds nothing, the way many first scripts are written:
synthetic data from numpy's global generator, a Python `random` split, and
`image_dataset_from_directory` without `seed=`. Rank 0 prints one JSON line:
whether the ranks drew alike, and how many distinct images one epoch of
fit trained (every one of them, exactly once, or the sharding is wrong).

    mpiexec -n 2 python -m transparent_dist unseeded.py DIR
"""

import json
import random
import sys
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from mpi4py import MPI

images = Path(sys.argv[1])
x = np.random.normal(size=(64, 3))
order = list(range(64))
random.shuffle(order)
drawn = MPI.COMM_WORLD.allgather((float(x.sum()), order[:5]))

# 80 images of 4x4 pixels whose first pixel is their number (in a real
# job they are there before it starts).
if MPI.COMM_WORLD.rank == 0:
    for number in range(80):
        folder = images / ("a" if number % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.full((4, 4, 3), number, np.uint8)
        tf.io.write_file(str(folder / f"{number:03d}.png"), tf.io.encode_png(pixels))
MPI.COMM_WORLD.Barrier()
dataset = keras.utils.image_dataset_from_directory(images, image_size=(4, 4), batch_size=4)

seen: list[int] = []


def record(batch):
    def keep(first_pixels):
        seen.extend(int(v) for v in first_pixels.numpy())
        return np.int32(0)

    done = tf.py_function(keep, [batch[:, 0, 0, 0]], tf.int32)
    with tf.control_dependencies([done]):
        return tf.identity(batch)


model = keras.Sequential(
    [
        keras.Input((4, 4, 3)),
        keras.layers.Lambda(record),
        keras.layers.Flatten(),
        keras.layers.Dense(2),
    ]
)
model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
model.fit(dataset, epochs=1, verbose=0)
trained = [n for part in MPI.COMM_WORLD.allgather(seen) for n in part]
print(
    json.dumps(
        {
            "alike": all(d == drawn[0] for d in drawn),
            "trained": len(trained),
            "distinct": len(set(trained)),
        }
    ),
    flush=True,
)

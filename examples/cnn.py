"""An ordinary Keras 3 script: a small CNN classifying generated images.

mpiexec -n 2 python -m transparent_dist examples/cnn.py --epochs 3
"""

import argparse

import keras
import numpy as np

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--samples", type=int, default=4096)
args = parser.parse_args()

# Images of noise with a bright square in one of four quadrants: the class.
rng = np.random.default_rng(1)
labels = rng.integers(0, 4, size=args.samples)
images = rng.normal(0, 1.0, size=(args.samples, 28, 28, 1)).astype("float32")
for i, label in enumerate(labels):
    r, c = divmod(int(label), 2)
    images[i, 4 + 14 * r : 10 + 14 * r, 4 + 14 * c : 10 + 14 * c, 0] += 1.0

model = keras.Sequential(
    [
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(16, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(4, activation="softmax"),
    ]
)
model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
model.fit(
    images,
    labels,
    batch_size=args.batch_size,
    epochs=args.epochs,
    validation_split=0.1,
    verbose=2,
)
loss, accuracy = model.evaluate(images, labels, verbose=0)
print(f"final: loss={loss:.4f} accuracy={accuracy:.4f}")

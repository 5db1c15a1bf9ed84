"""fit with the callbacks people use: ModelCheckpoint (best only),
EarlyStopping with restore_best_weights, ReduceLROnPlateau, CSVLogger,
LearningRateScheduler; then model.save.

Mirrors keras-io guides/training_with_built_in_methods.py ("Using
callbacks", "Checkpointing models") and guides/writing_your_own_callbacks.py.
"""

import argparse
import os

import keras
import numpy as np

parser = argparse.ArgumentParser()
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--epochs", type=int, default=6)
args = parser.parse_args()

keras.utils.set_random_seed(37)
x = np.random.normal(size=(700, 10)).astype("float32")
y = (np.sin(x[:, :3]).sum(axis=1, keepdims=True)).astype("float32")

model = keras.Sequential(
    [keras.Input((10,)), keras.layers.Dense(24, activation="relu"), keras.layers.Dense(1)]
)
model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="mse", metrics=["mae"])


def schedule(epoch, lr):
    return lr if epoch < 2 else lr * 0.9


os.makedirs("checkpoints", exist_ok=True)
callbacks = [
    keras.callbacks.ModelCheckpoint(
        "checkpoints/best.keras", monitor="val_loss", save_best_only=True
    ),
    keras.callbacks.EarlyStopping(monitor="val_loss", patience=2, restore_best_weights=True),
    keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=1),
    keras.callbacks.CSVLogger("training.csv"),
    keras.callbacks.LearningRateScheduler(schedule),
]
model.fit(
    x,
    y,
    batch_size=args.batch_size,
    epochs=args.epochs,
    validation_split=0.25,
    callbacks=callbacks,
    shuffle=False,
    verbose=2,
)
model.save("final.keras")

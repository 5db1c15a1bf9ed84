"""Step counts computed from the script's own batch size on an infinite,
shuffled `tf.data` stream, validation on a finite one, then a second model
fitted with `steps_per_execution`.

Mirrors tensorflow/docs site/en/guide/tpu.ipynb ("Train a model using
Keras high-level APIs": `get_dataset` with shuffle / repeat / batch,
`steps_per_epoch = 60000 // batch_size`, `validation_steps = 10000 //
batch_size`, and the second fit "with `steps_per_execution`"), without the
TPU strategy and on synthetic 12x12 digits instead of TFDS MNIST.
"""

import argparse

import keras
import numpy as np
import tensorflow as tf

parser = argparse.ArgumentParser()
parser.add_argument("--batch-size", type=int, default=200)
parser.add_argument("--epochs", type=int, default=2)
args = parser.parse_args()

keras.utils.set_random_seed(23)
rng = np.random.default_rng(5)
digits = {
    "train": rng.integers(0, 256, size=(480, 12, 12, 1)).astype("uint8"),
    "test": rng.integers(0, 256, size=(100, 12, 12, 1)).astype("uint8"),
}
labels = {k: (v[:, :6].mean(axis=(1, 2, 3)) / 25.6).astype("int64") for k, v in digits.items()}


def get_dataset(batch_size, is_training=True):
    split = "train" if is_training else "test"
    dataset = tf.data.Dataset.from_tensor_slices((digits[split], labels[split]))

    # Normalize the input data.
    def scale(image, label):
        image = tf.cast(image, tf.float32)
        image /= 255.0
        return image, label

    dataset = dataset.map(scale)

    # Only shuffle and repeat the dataset in training: an infinite dataset
    # has no last partial batch.
    if is_training:
        dataset = dataset.shuffle(256)
        dataset = dataset.repeat()

    dataset = dataset.batch(batch_size)
    return dataset


def create_model():
    return keras.Sequential(
        [
            keras.Input((12, 12, 1)),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


batch_size = args.batch_size
steps_per_epoch = 480 // batch_size
validation_steps = 100 // batch_size

train_dataset = get_dataset(batch_size, is_training=True)
test_dataset = get_dataset(batch_size, is_training=False)

model = create_model()
model.compile(
    optimizer="adam",
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=["sparse_categorical_accuracy"],
)
model.fit(
    train_dataset,
    epochs=args.epochs,
    steps_per_epoch=steps_per_epoch,
    validation_data=test_dataset,
    validation_steps=validation_steps,
    verbose=2,
)

# Several steps per tf.function call.
model = create_model()
model.compile(
    optimizer="adam",
    steps_per_execution=4,
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=["sparse_categorical_accuracy"],
)
model.fit(
    train_dataset,
    epochs=args.epochs,
    steps_per_epoch=steps_per_epoch,
    validation_data=test_dataset,
    validation_steps=validation_steps,
    verbose=2,
)

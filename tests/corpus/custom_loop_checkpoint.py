"""A custom GradientTape loop in a tf.function over a shuffled tf.data
stream with `take`, a lazily built model, and a tf.train.Checkpoint saved
by a CheckpointManager.

Mirrors horovod/examples/tensorflow2/tensorflow2_mnist.py with the hvd
lines removed (and the tf.train.Checkpoint / CheckpointManager pattern of
TensorFlow's "Training checkpoints" guide), on synthetic data.
"""

import argparse

import keras
import numpy as np
import tensorflow as tf

parser = argparse.ArgumentParser()
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--steps", type=int, default=20)
args = parser.parse_args()

keras.utils.set_random_seed(41)
images = np.random.random((800, 8, 8, 1)).astype("float32")
labels = (images.mean(axis=(1, 2, 3)) * 20).astype("int64") % 4

dataset = tf.data.Dataset.from_tensor_slices((images, labels))
dataset = dataset.repeat().shuffle(800).batch(args.batch_size)

model = keras.Sequential(
    [
        keras.layers.Conv2D(4, 3, activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(4, activation="softmax"),
    ]
)
loss = keras.losses.SparseCategoricalCrossentropy()
opt = keras.optimizers.Adam(0.001)
checkpoint = tf.train.Checkpoint(model=model, optimizer=opt)
manager = tf.train.CheckpointManager(checkpoint, "./checkpoints", max_to_keep=2)


@tf.function
def training_step(images, labels):
    with tf.GradientTape() as tape:
        probs = model(images, training=True)
        loss_value = loss(labels, probs)
    grads = tape.gradient(loss_value, model.trainable_variables)
    opt.apply_gradients(zip(grads, model.trainable_variables))
    return loss_value


for batch, (x, y) in enumerate(dataset.take(args.steps)):
    loss_value = training_step(x, y)
    if batch % 10 == 0:
        print(f"Step #{batch}\tLoss: {float(loss_value):.6f}")
        manager.save()
manager.save()

"""A file-list `tf.data` pipeline over GZIP TFRecord files, repeated for
exactly the epochs it trains (`repeat(n_epochs)`), with step counts and a
learning-rate schedule computed from the script's own batch size.

Mirrors the MLPerf-HPC CosmoFlow reference run as one process, without
Horovod (sparticlesteve/cosmoflow-benchmark: data/cosmo.py
`construct_dataset` (file list, TFRecordDataset, parse, repeat(n_epochs),
batch with drop_remainder), `n_train_steps = n_train // batch_size`;
utils/optimizers.py: the peak learning rate scaled linearly by the batch
size, reached by a linear warm-up, then decayed; train.py:
`ModelCheckpoint('checkpoint-{epoch:03d}...')`), on small synthetic
universes the script writes itself to a temporary directory.
"""

import argparse
import os
import tempfile
from functools import partial

import keras
import numpy as np
import tensorflow as tf

parser = argparse.ArgumentParser()
parser.add_argument("--batch-size", type=int, default=4)
parser.add_argument("--epochs", type=int, default=2)
args = parser.parse_args()

keras.utils.set_random_seed(29)
sample_shape = (8, 8, 8, 2)
n_train, n_valid, samples_per_file = 192, 48, 8


def write_universes(directory, first, n_files, rng):
    """Synthetic universes: a density field and the 4 parameters it came from."""
    paths = []
    for i in range(first, first + n_files):
        path = os.path.join(directory, f"univ_{i:03d}.tfrecord")
        with tf.io.TFRecordWriter(path, options="GZIP") as writer:
            for _ in range(samples_per_file):
                y = rng.uniform(0.5, 1.5, size=4).astype(np.float32)
                x = rng.gamma(2.0 * y[0], size=sample_shape).astype(np.float32)
                x[..., 1] *= y[1]
                x[:4] *= y[2]
                x[:, :4] *= y[3]
                feature = {
                    "x": tf.train.Feature(float_list=tf.train.FloatList(value=x.ravel())),
                    "y": tf.train.Feature(float_list=tf.train.FloatList(value=y)),
                }
                example = tf.train.Example(features=tf.train.Features(feature=feature))
                writer.write(example.SerializeToString())
        paths.append(path)
    return paths


def _parse_data(sample_proto, shape):
    parsed = tf.io.parse_single_example(
        sample_proto,
        features=dict(
            x=tf.io.FixedLenFeature(shape, tf.float32), y=tf.io.FixedLenFeature([4], tf.float32)
        ),
    )
    # Mean normalization, as the reference does.
    x, y = parsed["x"], parsed["y"]
    x /= tf.reduce_sum(x) / np.prod(shape)
    return x, y


def construct_dataset(filenames, batch_size, n_epochs, shuffle=False):
    data = tf.data.Dataset.from_tensor_slices(filenames)
    if shuffle:
        data = data.shuffle(len(filenames), reshuffle_each_iteration=True)
    data = data.interleave(
        lambda f: tf.data.TFRecordDataset(f, compression_type="GZIP"),
        cycle_length=4,
        num_parallel_calls=4,
    )
    data = data.map(partial(_parse_data, shape=sample_shape), num_parallel_calls=4)
    data = data.repeat(n_epochs)
    data = data.batch(batch_size, drop_remainder=True)
    return data.prefetch(4)


def lr_schedule(epoch, base_lr, peak_lr, n_warmup_epochs, decay_schedule):
    if epoch < n_warmup_epochs:
        return epoch * (peak_lr - base_lr) / n_warmup_epochs + base_lr
    factor = 1.0
    for e, d in decay_schedule.items():
        if e < epoch:
            factor = d
    return peak_lr * factor


def build_model():
    return keras.Sequential(
        [
            keras.Input(sample_shape),
            keras.layers.Conv3D(4, 2, padding="same"),
            keras.layers.LeakyReLU(0.3),
            keras.layers.MaxPooling3D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(16),
            keras.layers.LeakyReLU(0.3),
            keras.layers.Dense(4),
        ]
    )


with tempfile.TemporaryDirectory() as data_dir:
    rng = np.random.default_rng(7)
    train_files = write_universes(data_dir, 0, n_train // samples_per_file, rng)
    valid_files = write_universes(data_dir, len(train_files), n_valid // samples_per_file, rng)

    batch_size = args.batch_size
    n_epochs = args.epochs
    n_train_steps = n_train // batch_size
    n_valid_steps = n_valid // batch_size
    train_dataset = construct_dataset(train_files, batch_size, n_epochs, shuffle=True)
    valid_dataset = construct_dataset(valid_files, batch_size, n_epochs)

    # Linear scaling of the learning rate with the batch size.
    base_lr, base_batch_size = 0.02, 64
    peak_lr = base_lr * batch_size / base_batch_size
    schedule = partial(
        lr_schedule,
        base_lr=base_lr / 8,
        peak_lr=peak_lr,
        n_warmup_epochs=2,
        decay_schedule={2: 0.5},
    )

    model = build_model()
    model.compile(
        optimizer=keras.optimizers.SGD(base_lr, momentum=0.9),
        loss="mean_squared_error",
        metrics=["mean_absolute_error"],
    )
    os.makedirs("checkpoints", exist_ok=True)
    callbacks = [
        keras.callbacks.LearningRateScheduler(schedule),
        keras.callbacks.ModelCheckpoint("checkpoints/checkpoint-{epoch:03d}.keras"),
        keras.callbacks.CSVLogger("history.csv"),
    ]
    model.fit(
        train_dataset,
        steps_per_epoch=n_train_steps,
        epochs=n_epochs,
        validation_data=valid_dataset,
        validation_steps=n_valid_steps,
        callbacks=callbacks,
        verbose=2,
    )

"""Text classification: variable-length token sequences padded per batch
(`padded_batch`), Embedding (sparse gradients) + LSTM, Adam, and a batch
count that is not a multiple of the ranks.

Mirrors keras-io examples/nlp/bidirectional_lstm_imdb.py and the tf.data
text pipeline of TensorFlow's text classification tutorial, on a synthetic
vocabulary.
"""

import argparse

import keras
import numpy as np
import tensorflow as tf

parser = argparse.ArgumentParser()
parser.add_argument("--batch-size", type=int, default=16)
parser.add_argument("--epochs", type=int, default=2)
args = parser.parse_args()

max_features = 200
keras.utils.set_random_seed(21)
rng = np.random.default_rng(21)
lengths = rng.integers(3, 20, size=430)
texts = [rng.integers(1, max_features, size=n).tolist() for n in lengths]
labels = np.array([int(sum(t) / len(t) > max_features / 2) for t in texts], "float32")

dataset = tf.data.Dataset.from_generator(
    lambda: zip(texts, labels),
    output_signature=(tf.TensorSpec([None], tf.int32), tf.TensorSpec([], tf.float32)),
)
dataset = dataset.padded_batch(args.batch_size).cache()

inputs = keras.Input(shape=(None,), dtype="int32")
x = keras.layers.Embedding(max_features, 16, mask_zero=True)(inputs)
x = keras.layers.LSTM(8)(x)
outputs = keras.layers.Dense(1, activation="sigmoid")(x)
model = keras.Model(inputs, outputs)
model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
model.fit(dataset, epochs=args.epochs, verbose=2)

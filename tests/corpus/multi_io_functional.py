"""Functional API with two inputs and two outputs, loss_weights,
per-output metrics, dict inputs/targets from numpy arrays, a last batch
that is shorter than the others.

Mirrors keras-io guides/functional_api.py ("Models with multiple inputs
and outputs": the ticket-priority / department model).
"""

import argparse

import keras
import numpy as np

parser = argparse.ArgumentParser()
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--epochs", type=int, default=2)
args = parser.parse_args()

num_tags, num_words, num_departments = 6, 100, 4
keras.utils.set_random_seed(9)
title_data = np.random.randint(num_words, size=(500, 8))
tags_data = np.random.randint(2, size=(500, num_tags)).astype("float32")
priority_targets = np.random.random(size=(500, 1)).astype("float32")
dept_targets = np.random.randint(2, size=(500, num_departments)).astype("float32")

title_input = keras.Input(shape=(None,), name="title")
tags_input = keras.Input(shape=(num_tags,), name="tags")
title_features = keras.layers.Embedding(num_words, 8)(title_input)
title_features = keras.layers.GlobalAveragePooling1D()(title_features)
x = keras.layers.concatenate([title_features, tags_input])
priority_pred = keras.layers.Dense(1, name="priority")(x)
department_pred = keras.layers.Dense(num_departments, name="department")(x)
model = keras.Model(inputs=[title_input, tags_input], outputs=[priority_pred, department_pred])

model.compile(
    optimizer=keras.optimizers.RMSprop(1e-3),
    loss={
        "priority": keras.losses.BinaryCrossentropy(from_logits=True),
        "department": keras.losses.CategoricalCrossentropy(from_logits=True),
    },
    loss_weights={"priority": 1.0, "department": 0.2},
    metrics={"priority": ["mae"], "department": ["categorical_accuracy"]},
)
model.fit(
    {"title": title_data, "tags": tags_data},
    {"priority": priority_targets, "department": dept_targets},
    epochs=args.epochs,
    batch_size=args.batch_size,
    shuffle=False,
    verbose=2,
)

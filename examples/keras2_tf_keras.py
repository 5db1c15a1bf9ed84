"""A Keras 2 script (tf_keras): run with TF_USE_LEGACY_KERAS=1 so that
`tf.keras` is tf_keras, unchanged, data-parallel:

    pip install -e '.[tf_keras]'
    TF_USE_LEGACY_KERAS=1 mpiexec -n 2 python -m transparent_dist examples/keras2_tf_keras.py
"""

import numpy as np
import tensorflow as tf

keras = tf.keras
rng = np.random.default_rng(0)
x = rng.normal(size=(8192, 20)).astype("float32")
y = (x[:, :5].sum(axis=1) > 0).astype("float32")

model = keras.Sequential(
    [
        keras.layers.Dense(64, activation="relu", input_shape=(20,)),
        keras.layers.Dense(1, activation="sigmoid"),
    ]
)
model.compile(optimizer="adam", loss="binary_crossentropy", metrics=["accuracy"])
model.fit(x, y, batch_size=64, epochs=3, validation_split=0.1, verbose=2)
print("evaluate:", model.evaluate(x, y, verbose=0))

"""Three training scripts the way users write them, beyond Keras 3's fit,
slow enough to be interrupted: KIND=tf_keras (`fit` in Keras 2, with
EarlyStopping, ReduceLROnPlateau, LearningRateScheduler and CSVLogger,
whose numbers and OUT/log.csv also go to the JSON), loop (a
Keras 3 model trained by a `tf.function` GradientTape loop), tf1 (a
`tf.compat.v1` session loop). Writes OUT/pid-rank<r>, OUT/progress-rank<r>
(one line per step) and OUT/<tag>-rank<r>.json (the final weights).

    [TD_CHECKPOINT_DIR=...] mpiexec -n 2 python -m transparent_dist preemptible_kinds.py OUT TAG
"""

import json
import os
import sys
import time

import numpy as np

kind = os.environ["KIND"]
extra = {}
if kind == "tf_keras":
    os.environ["TF_USE_LEGACY_KERAS"] = "1"

import tensorflow as tf  # noqa: E402

import transparent_dist  # noqa: E402

out, tag = sys.argv[1], sys.argv[2]
rank = transparent_dist.rank()
with open(os.path.join(out, f"pid-rank{rank}"), "w") as f:
    f.write(str(os.getpid()))


def progress():
    with open(os.path.join(out, f"progress-rank{rank}"), "a") as f:
        f.write("step\n")
    # Slow only where a test interrupts the run (STEP_SECONDS=0.1).
    time.sleep(float(os.environ.get("STEP_SECONDS", "0")))


rng = np.random.default_rng(0)
x = rng.normal(size=(960, 8)).astype("float32")
y = (x @ rng.normal(size=(8, 1))).astype("float32")
EPOCHS, BATCH = 3, 16

if kind == "tf_keras":
    import tf_keras as keras

    class Progress(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            progress()

    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    # Stateful callbacks, resumed too: no epoch improves the loss by 10, so
    # the rate halves after each epoch but the first and training stops
    # after the third; the CSV log is rewritten (append=False) by each run.
    early = keras.callbacks.EarlyStopping(monitor="loss", min_delta=10, patience=2)
    history = model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=EPOCHS,
        shuffle=False,
        verbose=0,
        callbacks=[
            Progress(),
            early,
            keras.callbacks.ReduceLROnPlateau(monitor="loss", min_delta=10, patience=1),
            keras.callbacks.LearningRateScheduler(lambda epoch, lr: lr * 0.9),
            keras.callbacks.CSVLogger(os.path.join(out, "log.csv")),
        ],
    )
    weights = [v.numpy() for v in model.trainable_variables]
    extra = {"history": history.history, "stopped_epoch": early.stopped_epoch}
    if rank == 0:
        extra["csv"] = open(os.path.join(out, "log.csv")).read()

elif kind == "loop":
    import keras

    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)]
    )
    optimizer = keras.optimizers.Adam(0.01)
    loss_fn = keras.losses.MeanSquaredError()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    dataset = dataset.shard(transparent_dist.size(), transparent_dist.rank())

    @tf.function
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))  # noqa: B905
        return loss

    for _epoch in range(EPOCHS):
        for xb, yb in dataset:
            train_step(xb, yb)
            progress()
    weights = [v.numpy() for v in model.trainable_variables]

else:  # tf1
    tf.compat.v1.disable_eager_execution()
    tf.compat.v1.set_random_seed(3)
    xs = tf.compat.v1.placeholder(tf.float32, [None, 8])
    ys = tf.compat.v1.placeholder(tf.float32, [None, 1])
    w1 = tf.compat.v1.get_variable("w1", [8, 16])
    b1 = tf.compat.v1.get_variable("b1", [16], initializer=tf.compat.v1.zeros_initializer())
    w2 = tf.compat.v1.get_variable("w2", [16, 1])
    b2 = tf.compat.v1.get_variable("b2", [1], initializer=tf.compat.v1.zeros_initializer())
    predictions = tf.matmul(tf.nn.relu(tf.matmul(xs, w1) + b1), w2) + b2
    loss = tf.reduce_mean(tf.square(predictions - ys))
    train_op = tf.compat.v1.train.AdamOptimizer(0.01).minimize(loss)
    start, stop = transparent_dist.shard_range(len(x))
    mine_x, mine_y = x[start:stop], y[start:stop]
    with tf.compat.v1.Session() as sess:
        sess.run(tf.compat.v1.global_variables_initializer())
        for _epoch in range(EPOCHS):
            for i in range(0, len(mine_x), BATCH):
                sess.run([train_op, loss], {xs: mine_x[i : i + BATCH], ys: mine_y[i : i + BATCH]})
                progress()
        weights = sess.run(tf.compat.v1.trainable_variables())

flat = np.concatenate([np.asarray(w).ravel() for w in weights])
with open(os.path.join(out, f"{tag}-rank{rank}.json"), "w") as f:
    json.dump({"weights": flat.tolist(), **extra}, f, default=float)

"""Scenarios of the core Keras 3 tests, all run in one process per job
(TensorFlow's import costs seconds per rank, so one job runs them all).

    mpiexec -n N python -m transparent_dist keras_core.py OUT plugin
    python keras_core.py OUT reference N     # plain Keras, batch N*b
    mpiexec -n N python keras_core.py OUT control   # plugin off

Each rank writes OUT/<mode>-<N>-rank<r>.json with what every scenario saw.
The tests compare these numbers; nothing here asserts.
"""

import json
import math
import os
import sys
import time

import numpy as np

OUT, MODE = sys.argv[1], sys.argv[2]
if MODE == "reference":
    RANK, SIZE, EMULATED = 0, 1, int(sys.argv[3])
else:
    RANK, SIZE = (
        int(os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", 0))),
        int(os.environ.get("PMI_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE", 1))),
    )
    EMULATED = SIZE

if MODE == "plugin":
    # XLA's own record of what it compiled, per rank (test_keras_core reads
    # it): set before TensorFlow reads it.
    os.environ["XLA_FLAGS"] = (
        f"--xla_dump_to={OUT}/xla-{MODE}-{EMULATED}-rank{RANK} --xla_dump_hlo_as_text"
    )
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

B = 16  # per-rank batch size
GLOBAL_B = B * EMULATED
LOCAL_B = B if MODE != "reference" else GLOBAL_B
N_SAMPLES = 500
rng = np.random.default_rng(0)
X = rng.normal(size=(N_SAMPLES, 8)).astype("float32")
Y = (X @ rng.normal(size=(8, 1)) + 0.1).astype("float32")


def weights(model):
    return np.concatenate([v.numpy().ravel() for v in model.trainable_variables]).tolist()


def mlp(seed=1):
    if seed is not None:
        keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(1)]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.5), loss="mse", metrics=["mae"])
    return model


def scenario_arrays(shuffle):
    model = mlp(seed=7 if shuffle else 1)
    history = model.fit(
        X, Y, batch_size=LOCAL_B, epochs=3, shuffle=shuffle, verbose=0, validation_split=0.2
    )
    return {
        "weights": weights(model),
        "history": history.history,
        "evaluate": model.evaluate(X, Y, batch_size=LOCAL_B, verbose=0),
        "predict": model.predict(X[:101], batch_size=LOCAL_B, verbose=0).ravel().tolist(),
    }


def scenario_unseeded():
    # As an unseeded start would, every rank draws different initial weights
    # (seeded by rank so that they surely differ).
    model = mlp(seed=1000 + RANK)
    initial = weights(model)
    # (shuffle=False: the ranks' TF seeds differ too, so they agree on a
    # common permutation, which the single-process reference cannot know.)
    model.fit(X, Y, batch_size=LOCAL_B, epochs=1, shuffle=False, verbose=0)
    return {"initial": initial, "weights": weights(model)}


class SeenIds(keras.metrics.Metric):
    """Counts how often each sample id (column 1 of y) was trained on."""

    def __init__(self, **kwargs):
        super().__init__(name="seen", **kwargs)
        self.counts = self.add_variable((N_SAMPLES,), initializer="zeros", name="counts")

    def update_state(self, y_true, y_pred, sample_weight=None):
        ids = tf.cast(y_true[:, 1], "int32")
        self.counts.assign_add(
            tf.math.bincount(ids, minlength=N_SAMPLES, maxlength=N_SAMPLES, dtype="float32")
        )

    def result(self):
        return {"seen_min": tf.reduce_min(self.counts), "seen_max": tf.reduce_max(self.counts)}


class RecordLocalCounts(keras.callbacks.Callback):
    def __init__(self, metric):
        super().__init__()
        self.metric, self.per_epoch = metric, []

    def on_epoch_end(self, epoch, logs=None):
        counts = self.metric.counts.numpy()
        self.per_epoch.append(
            {
                "ids": np.flatnonzero(counts).tolist(),
                "max": float(counts.max()),
                "global_min": float(logs["seen_min"]),
                "global_max": float(logs["seen_max"]),
            }
        )


def scenario_sample_usage():
    keras.utils.set_random_seed(3)
    metric = SeenIds()
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])
    model.compile(
        optimizer="sgd",
        loss=lambda yt, yp: keras.ops.mean(keras.ops.square(yt[:, :1] - yp)),
        metrics=[metric],
    )
    y2 = np.concatenate([Y, np.arange(N_SAMPLES, dtype="float32")[:, None]], axis=1)
    record = RecordLocalCounts(metric)
    model.fit(X, y2, batch_size=LOCAL_B, epochs=2, shuffle=True, verbose=0, callbacks=[record])
    return {"epochs": record.per_epoch}


class RecordingCheckpoint(keras.callbacks.ModelCheckpoint):
    """A ModelCheckpoint that notes which rank wrote."""

    def _save_model(self, *args, **kwargs):
        with open(os.path.join(OUT, "checkpoint-writers.txt"), "a") as f:
            f.write(f"{RANK}\n")
        return super()._save_model(*args, **kwargs)


def scenario_files():
    model = mlp()
    model.fit(
        X,
        Y,
        batch_size=LOCAL_B,
        epochs=2,
        verbose=0,
        validation_split=0.2,
        callbacks=[
            keras.callbacks.CSVLogger(os.path.join(OUT, "log.csv")),
            RecordingCheckpoint(
                os.path.join(OUT, "best.keras"), monitor="val_loss", save_best_only=True
            ),
        ],
    )
    model.save(os.path.join(OUT, "final.keras"))
    model.save_weights(os.path.join(OUT, "final.weights.h5"))
    return {"weights": weights(model)}


def scenario_early_stopping():
    model = mlp()
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=0, min_delta=0.5)
    history = model.fit(
        X, Y, batch_size=LOCAL_B, epochs=10, verbose=0, validation_split=0.2, callbacks=[stop]
    )
    return {"epochs_run": len(history.history["loss"]), "weights": weights(model)}


def scenario_dataset():
    model = mlp()
    ds = tf.data.Dataset.from_tensor_slices((X, Y)).batch(B if MODE != "reference" else GLOBAL_B)
    history = model.fit(ds, epochs=2, verbose=0)
    return {
        "weights": weights(model),
        "history": history.history,
        "evaluate": model.evaluate(ds, verbose=0),
    }


class Batches(keras.utils.PyDataset):
    def __init__(self, batch):
        super().__init__()
        self.batch = batch

    def __len__(self):
        return math.ceil(N_SAMPLES / self.batch)

    def __getitem__(self, i):
        s = slice(i * self.batch, (i + 1) * self.batch)
        return X[s], Y[s]


def scenario_pydataset():
    model = mlp()
    history = model.fit(Batches(B if MODE != "reference" else GLOBAL_B), epochs=2, verbose=0)
    return {"weights": weights(model), "history": history.history}


def scenario_generator():
    model = mlp()
    batch = B if MODE != "reference" else GLOBAL_B
    gen = ((X[i : i + batch], Y[i : i + batch]) for i in range(0, N_SAMPLES, batch))
    history = model.fit(gen, epochs=1, verbose=0)
    return {"weights": weights(model), "history": history.history}


def scenario_dict_inputs():
    keras.utils.set_random_seed(5)
    a, b = keras.Input((5,), name="a"), keras.Input((3,), name="b")
    hidden = keras.layers.Dense(8, activation="relu")(keras.layers.Concatenate()([a, b]))
    model = keras.Model({"a": a, "b": b}, keras.layers.Dense(1)(hidden))
    model.compile(optimizer="adam", loss="mse")
    history = model.fit({"a": X[:, :5], "b": X[:, 5:]}, Y, batch_size=LOCAL_B, epochs=2, verbose=0)
    return {"weights": weights(model), "history": history.history}


def scenario_custom_loop():
    # Each rank feeds its own data from an unseeded start: with the plugin
    # the ranks must still end identical.
    model = mlp(seed=2000 + RANK)
    optimizer = keras.optimizers.Adam(0.01)
    local = np.random.default_rng(100 + RANK)
    x = local.normal(size=(64, 8)).astype("float32")
    y = local.normal(size=(64, 1)).astype("float32")

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = keras.ops.mean(keras.ops.square(model(xb) - yb))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    for i in range(0, 64, 16):
        step(x[i : i + 16], y[i : i + 16])
    return {"weights": weights(model)}


def scenario_global_batch():
    if MODE == "reference":
        batch = 48
    else:
        import transparent_dist

        transparent_dist.configure(batch_size="global")
        batch = 48
    model = mlp()
    model.fit(X, Y, batch_size=batch, epochs=2, shuffle=False, verbose=0)
    if MODE != "reference":
        transparent_dist.configure(batch_size="per_rank")
    return {"weights": weights(model)}


def scenario_lr_scaling():
    if MODE != "plugin":
        return {}
    import transparent_dist

    transparent_dist.configure(lr_scaling="linear", warmup_epochs=1)
    model = mlp()
    model.fit(X, Y, batch_size=B, epochs=2, verbose=0)
    transparent_dist.configure(lr_scaling="none")
    return {"lr": float(model.optimizer.learning_rate.numpy())}


def scenario_xla():
    # Keras's own train step keeps XLA (compiled up to the update, the
    # exchange after it), in float32 and under mixed precision's
    # LossScaleOptimizer; a script's own train step, the update inside it,
    # runs without (said once). XLA_FLAGS above: XLA's own record.
    model = mlp()
    model.compile(optimizer="sgd", loss="mse", metrics=["mae"], jit_compile=True)
    history = model.fit(X, Y, batch_size=LOCAL_B, epochs=1, verbose=0)
    out = {
        "jit_compile": bool(model.jit_compile),
        "weights": weights(model),
        "history": history.history,
        "evaluate": model.evaluate(X, Y, batch_size=LOCAL_B, verbose=0),
    }
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        mixed = mlp()  # scenario_mixed_precision's model, with XLA
        mixed.compile(
            optimizer=keras.optimizers.SGD(0.05, momentum=0.5),
            loss="mse",
            metrics=["mae"],
            jit_compile=True,
        )
        history = mixed.fit(X, Y, batch_size=LOCAL_B, epochs=2, shuffle=False, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    out["mixed"] = {"weights": weights(mixed), "history": history.history}
    keras.utils.set_random_seed(1)
    inputs = keras.Input((8,))
    own = TrackedModel(inputs, keras.layers.Dense(1)(keras.layers.Dense(16)(inputs)))
    own.compile(optimizer=keras.optimizers.SGD(0.05), jit_compile=True)
    own.fit(X, Y, batch_size=LOCAL_B, epochs=1, shuffle=False, verbose=0)
    out["own_step"] = {"jit_compile": bool(own.jit_compile), "weights": weights(own)}
    return out


def scenario_mixed_precision():
    # Keras wraps the optimizer in a LossScaleOptimizer, whose scale_loss
    # the plugin divides by N exactly once.
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = mlp()
        history = model.fit(X, Y, batch_size=LOCAL_B, epochs=2, shuffle=False, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return {
        "optimizer": type(model.optimizer).__name__,
        "weights": weights(model),
        "history": history.history,
    }


class OneBatch(keras.utils.PyDataset):
    def __init__(self, n):
        super().__init__()
        self.n = n

    def __len__(self):
        return 1

    def __getitem__(self, i):
        return X[: self.n], Y[: self.n]


def scenario_few_rows():
    # predict / evaluate of fewer rows than ranks (keras-io's VAE decodes
    # one latent point per call: 1) and of a row count neither 2 nor 3
    # divides (5), for every kind of input; a fixed batch of 4 in every mode.
    # (Evaluation of 1 row used to leave a rank an empty batch.)
    model = mlp()
    keras.utils.set_random_seed(5)
    a, b = keras.Input((5,), name="a"), keras.Input((3,), name="b")
    hidden = keras.layers.Dense(4, activation="tanh")(keras.layers.Concatenate()([a, b]))
    two_inputs = keras.Model({"a": a, "b": b}, keras.layers.Dense(1)(hidden))
    two_inputs.compile(optimizer="sgd", loss="mse", metrics=["mae"])
    # Conv1D and LSTM fail on an empty batch: no rank may be given one.
    keras.utils.set_random_seed(6)
    sequences = keras.Sequential(
        [
            keras.Input((8, 1)),
            keras.layers.Conv1D(4, 3, padding="same"),
            keras.layers.LSTM(4),
            keras.layers.Dense(1),
        ]
    )
    sequences.compile(optimizer="sgd", loss="mse", metrics=["mae"])
    out = {}
    for n in (1, 5):
        x, y = X[:n], Y[:n]
        unknown = tf.data.Dataset.from_tensor_slices((x, y)).filter(lambda *_: True).batch(4)
        calls = {
            "arrays": (model, x, y),
            "dict": (two_inputs, {"a": x[:, :5], "b": x[:, 5:]}, y),
            "conv_lstm": (sequences, x[:, :, None], y),
            "dataset": (model, tf.data.Dataset.from_tensor_slices((x, y)).batch(4), None),
            "unknown_length": (model, unknown, None),
            "pydataset": (model, OneBatch(n), None),
        }
        for kind, (m, data, target) in calls.items():
            size = {"batch_size": 4} if target is not None else {}
            out[f"predict_{kind}_{n}"] = m.predict(data, verbose=0, **size).ravel().tolist()
            out[f"evaluate_{kind}_{n}"] = m.evaluate(data, target, verbose=0, **size)
        batches = ((x[i : i + 4], y[i : i + 4]) for i in range(0, n, 4))
        out[f"evaluate_generator_{n}"] = model.evaluate(batches, verbose=0)
    return out


class TrackedModel(keras.Model):
    """keras-io's custom train_step: the loss of each batch in a `Mean`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_tracker = keras.metrics.Mean(name="loss")

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = keras.ops.mean(keras.ops.square(self(x, training=True) - y))
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables, strict=True))
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}

    @property
    def metrics(self):
        return [self.loss_tracker]


def scenario_tracker_tail():
    # 500 samples leave a last round of 20 rows, split 16/4 on 2 ranks and
    # 8/8/4 on 3: the tracker must count it as one process counts its last
    # batch, for a dataset of unknown length (which runs out mid-epoch) and
    # of known length alike.
    out = {}
    for kind in ("unknown", "known"):
        keras.utils.set_random_seed(1)
        inputs = keras.Input((8,))
        hidden = keras.layers.Dense(16, activation="tanh")(inputs)
        model = TrackedModel(inputs, keras.layers.Dense(1)(hidden))
        model.compile(optimizer=keras.optimizers.SGD(0.05))
        ds = tf.data.Dataset.from_tensor_slices((X, Y))
        if kind == "unknown":
            ds = ds.filter(lambda *_: True)
        history = model.fit(ds.batch(B if MODE != "reference" else GLOBAL_B), epochs=2, verbose=0)
        out[kind] = {"weights": weights(model), "history": history.history}
    return out


SCENARIOS = {
    "arrays": lambda: scenario_arrays(False),
    "arrays_shuffled": lambda: scenario_arrays(True),
    "unseeded": scenario_unseeded,
    "sample_usage": scenario_sample_usage,
    "files": scenario_files,
    "early_stopping": scenario_early_stopping,
    "dataset": scenario_dataset,
    "pydataset": scenario_pydataset,
    "generator": scenario_generator,
    "dict_inputs": scenario_dict_inputs,
    "custom_loop": scenario_custom_loop,
    "global_batch": scenario_global_batch,
    "lr_scaling": scenario_lr_scaling,
    "xla": scenario_xla,
    "mixed_precision": scenario_mixed_precision,
    "few_rows": scenario_few_rows,
    "tracker_tail": scenario_tracker_tail,
}
ONLY = os.environ.get("SCENARIOS")
results, seconds = {}, {}
for name, run in SCENARIOS.items():
    if ONLY and name not in ONLY.split(","):
        continue
    if MODE == "control" and name in ("files", "lr_scaling", "few_rows", "tracker_tail"):
        continue
    start = time.perf_counter()
    results[name] = run()
    seconds[name] = round(time.perf_counter() - start, 2)
with open(os.path.join(OUT, f"{MODE}-{EMULATED}-rank{RANK}.json"), "w") as f:
    json.dump(results, f)
with open(os.path.join(OUT, f"{MODE}-{EMULATED}-seconds-rank{RANK}.json"), "w") as f:
    json.dump(seconds, f)  # where a job's time goes, for whoever trims it

"""Scenarios for the failures real scripts hit (uneven batch counts,
tf.train.Checkpoint, the plugin's readers given to fit, random draws in a
step, sparse gradients of lookups per sample and shared by the batch), all
in one process per rank.

    mpiexec -n N python -m transparent_dist regressions.py OUT plugin
    mpiexec -n N python regressions.py OUT control      # TD_DISABLE=1

Each rank writes OUT/<mode>-rank<r>.json. Nothing here asserts.
"""

import json
import os
import sys

import h5py
import keras
import numpy as np
import tensorflow as tf

OUT, MODE = sys.argv[1], sys.argv[2]
RANK = int(os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", 0)))
SIZE = int(os.environ.get("PMI_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE", 1)))
result = {}


class SeenIds(keras.layers.Layer):
    """Passes its first input on; records the ids (second input) and the
    batch size of every training batch."""

    def __init__(self, log):
        super().__init__()
        self.record = log.append  # not the list: Keras would track a copy

    def call(self, inputs, training=None):
        values, ids = inputs
        if training is not False:  # None in a functional model without BatchNorm

            def keep(batch_ids):
                self.record(batch_ids.copy())
                return np.int64(0)

            tf.numpy_function(keep, [ids], tf.int64)
        return values


def conv_bn_model(log, length=8):
    keras.utils.set_random_seed(3)
    x_in, id_in = keras.Input((length, 1)), keras.Input((), dtype="int64")
    h = SeenIds(log)((x_in, id_in))
    h = keras.layers.Conv1D(4, 3)(h)
    h = keras.layers.BatchNormalization()(h)
    out = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling1D()(h))
    model = keras.Model([x_in, id_in], out)
    model.compile(keras.optimizers.SGD(0.01), "mse")
    return model


def accounting(fit_data, epochs=2, **fit_kwargs):
    """Trains on `fit_data(x, ids, y)` (fit's x, or a dict of its arguments); returns per epoch the ids this rank
    saw, the smallest local batch, and the history."""
    log, per_epoch = [], []

    class EpochEnd(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            per_epoch.append(np.concatenate(log).tolist() if log else [])
            sizes.append(min(len(b) for b in log) if log else 0)
            log.clear()

    sizes = []
    n = fit_kwargs.pop("n", 1027)
    rng = np.random.default_rng(0)
    x = rng.random((n, 8, 1), dtype=np.float32)
    y = x.mean(axis=(1, 2))[:, None]
    model = conv_bn_model(log)
    data = fit_data(x, np.arange(n), y)
    data = data if isinstance(data, dict) else {"x": data}
    history = model.fit(**data, epochs=epochs, verbose=0, callbacks=[EpochEnd()], **fit_kwargs)
    return {"ids": per_epoch, "smallest_batch": sizes, "history": history.history, "n": n}


B = 16
# 1027 samples: 65 batches of 16 (64 full + 3 rows), not a multiple of 2 or 3.
result["dataset_shuffled"] = accounting(
    lambda x, i, y: tf.data.Dataset.from_tensor_slices(((x, i), y)).shuffle(1027).batch(B),
    epochs=3,
    validation_data=tf.data.Dataset.from_tensor_slices(
        ((np.zeros((37, 8, 1), "float32"), np.zeros(37, "int64")), np.zeros((37, 1), "float32"))
    ).batch(B),
)
result["dataset_unknown_length"] = accounting(
    lambda x, i, y: (
        tf.data.Dataset.from_tensor_slices(((x, i), y)).filter(lambda a, b: True).batch(B)
    )
)


class Loader(keras.utils.PyDataset):
    def __init__(self, x, ids, y):
        super().__init__()
        self.x, self.ids, self.y = x, ids, y

    def __len__(self):
        return -(-len(self.x) // B)

    def __getitem__(self, k):
        s = slice(k * B, (k + 1) * B)
        return (self.x[s], self.ids[s]), self.y[s]


result["pydataset"] = accounting(lambda x, i, y: Loader(x, i, y))


def generator(x, ids, y):
    for k in range(0, len(x), B):  # one pass: 65 batches, the last one of 3 rows
        yield (x[k : k + B], ids[k : k + B]), y[k : k + B]


result["generator"] = accounting(generator, epochs=1)
# Arrays whose last global batch has fewer samples than ranks (97 = 3*32+1,
# 2*48+1): the missing samples move into it from the batch before.
result["arrays_tiny_tail"] = accounting(
    lambda x, i, y: {"x": (x, i), "y": y}, n=97, batch_size=B, shuffle=False
)

# ---------------------------------------------------------------- checkpoints
directory = os.path.join(OUT, f"{MODE}-checkpoints-rank{RANK}")
checkpoint = tf.train.Checkpoint(step=tf.Variable(5))
saved = checkpoint.save(os.path.join(directory, "ckpt"))
manager = tf.train.CheckpointManager(checkpoint, os.path.join(directory, "managed"), max_to_keep=1)
managed = [manager.save(), manager.save()]
result["checkpoint"] = {
    "saved": saved,
    "managed": managed,
    "save_counter": int(checkpoint.save_counter.numpy()),
    "files": sorted(
        os.path.relpath(os.path.join(d, f), directory)
        for d, _, fs in os.walk(directory)
        for f in fs
    ),
}

# ---------------------------------------------------------------- readers
data_file = os.path.join(OUT, f"{MODE}-rows.h5")
if RANK == 0:
    rng = np.random.default_rng(1)
    with h5py.File(data_file + ".tmp", "w") as f:
        f["x"] = rng.normal(size=(1000, 4)).astype("float32")
        f["id"] = np.arange(1000)
    os.replace(data_file + ".tmp", data_file)
if SIZE > 1:
    from mpi4py import MPI

    MPI.COMM_WORLD.Barrier()
from transparent_dist.data import read_hdf5  # noqa: E402

x, ids = read_hdf5(data_file, "x"), read_hdf5(data_file, "id")
log = []
keras.utils.set_random_seed(4)
x_in, id_in = keras.Input((4,)), keras.Input((), dtype="int64")
out = keras.layers.Dense(1)(SeenIds(log)((x_in, id_in)))
model = keras.Model([x_in, id_in], out)
model.compile("sgd", "mse")
steps = []


class Steps(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        steps.append(batch)


model.fit((x / 2.0, ids), x.sum(axis=1), batch_size=50, epochs=1, verbose=0, callbacks=[Steps()])
result["readers"] = {
    "rows_here": len(x),
    "kind": type(x).__name__,
    "steps": len(steps),
    "ids": np.concatenate(log).tolist(),
    "predicted_rows": len(model.predict((x, ids), verbose=0)),
}


# ---------------------------------------------------------------- random draws
class Noisy(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(1)
        self.seed_generator = keras.random.SeedGenerator(1337)
        self.draws = []

    def call(self, x):
        return self.dense(x)

    def train_step(self, data):
        x, y = data
        noise = keras.random.normal((2,), seed=self.seed_generator)
        fixed = keras.random.normal((2,), seed=42)
        tf.numpy_function(
            lambda a, b: self.draws.append((a.tolist(), b.tolist())) or np.int64(0),
            [noise, fixed],
            tf.int64,
        )
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(self(x) - y))
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables, strict=True))
        return {"loss": loss}


noisy = Noisy()
noisy.compile(optimizer="sgd")
noisy.fit(
    np.ones((6 * SIZE, 3), "float32"), np.ones((6 * SIZE, 1), "float32"), batch_size=2, verbose=0
)
result["draws"] = noisy.draws


# ---------------------------------------------------------------- lookups
# Sparse gradients of lookups per sample and of lookups shared by the batch,
# in one model: keras-io's TokenAndPositionEmbedding (tokens from the data,
# positions `arange(maxlen)`) plus a "segment" table looked up per sample
# with ids that are 0 in every sample (the same indices on every rank) and
# once more with a constant id (a row shared by the batch, in the same
# table). Final weights by table; control mode trains one process at the
# global batch of 2 and 3 ranks.
MAXLEN, VOCAB, DIM, LOOKUP_B = 12, 30, 4, 8


class TokenAndPositionEmbedding(keras.layers.Layer):
    def __init__(self):
        super().__init__()
        self.token_emb = keras.layers.Embedding(VOCAB, DIM)
        self.pos_emb = keras.layers.Embedding(MAXLEN, DIM)

    def call(self, x):
        positions = keras.ops.arange(start=0, stop=keras.ops.shape(x)[-1], step=1)
        return self.token_emb(x) + self.pos_emb(positions)


class Segments(keras.layers.Layer):
    def __init__(self):
        super().__init__()
        self.table = keras.layers.Embedding(2, DIM)

    def call(self, ids):
        shared_row = self.table(keras.ops.ones((1,), "int32"))
        return self.table(ids) + shared_row


def lookups(optimizer, batch_size):
    keras.utils.set_random_seed(5)
    tokens = keras.Input((MAXLEN,), dtype="int32")
    segments = keras.Input((MAXLEN,), dtype="int32")
    embedded = TokenAndPositionEmbedding()
    segment = Segments()
    h = embedded(tokens) + segment(segments)
    out = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling1D()(h))
    model = keras.Model([tokens, segments], out)
    model.compile(optimizer, "mse")
    rng = np.random.default_rng(6)
    # 203 samples: a last global batch of 11, split 6/5 and 4/4/3.
    x = rng.integers(0, VOCAB, (203, MAXLEN)).astype("int32")
    y = (x.mean(axis=1, keepdims=True) / VOCAB).astype("float32")
    weights = rng.random(203).astype("float32")
    model.fit(
        [x, np.zeros_like(x)],
        y,
        sample_weight=weights,
        batch_size=batch_size,
        epochs=2,
        verbose=0,
        shuffle=False,
    )
    tables = {
        "token": embedded.token_emb.embeddings,
        "position": embedded.pos_emb.embeddings,
        "segment": segment.table.embeddings,
    }
    result = {name: np.asarray(v.numpy()).tolist() for name, v in tables.items()}
    result["dense"] = [np.asarray(w).tolist() for w in model.layers[-1].get_weights()]
    return result


if MODE == "plugin":
    from transparent_dist.tf import exchange, sparse

    trained = {"adam": lookups("adam", LOOKUP_B)}
    # RMSprop through the numpy exchange (the loss not divided by N first).
    native_path = exchange.uses_native()
    exchange._PATH["native"] = False
    trained["rmsprop"] = lookups("rmsprop", LOOKUP_B)
    exchange._PATH["native"] = native_path
    # The control: every row gathered, as before the fix.
    rule = sparse._depends_on_batch
    sparse._depends_on_batch = lambda indices: True
    trained["adam_all_gathered"] = lookups("adam", LOOKUP_B)
    sparse._depends_on_batch = rule
else:
    # One process at the global batch of 2 and 3 ranks: rank r of the
    # control job trains the references of every SIZE-th rank count.
    trained = {
        f"{optimizer}_one_process_{ranks}": lookups(optimizer, LOOKUP_B * ranks)
        for ranks in [2, 3][RANK::SIZE]
        for optimizer in ("adam", "rmsprop")
    }
result["lookups"] = trained

with open(os.path.join(OUT, f"{MODE}-rank{RANK}.json"), "w") as f:
    json.dump(result, f)

"""This rank's part of the data given to Keras `fit`, `evaluate`, `predict`.

```python
import numpy as np
from transparent_dist import keras_inputs
x, y = np.zeros((500, 4)), np.zeros((500, 1))
ds, steps = keras_inputs.array_batches((x, y), 500, global_batch=96,
                                       shuffle=False, rank=0, size=3)
```

In-memory arrays become a `tf.data.Dataset` of this rank's local batches:
global batch k is the k-th batch that plain Keras would take with batch size
N*b (same order; the same `shuffle` permutation, because the index order is
drawn by Keras's own `ArrayDataAdapter`), and each rank gathers its
contiguous block of it (`sharding.shard_range` of the batch). Every rank
runs the same number of steps; a rank whose block of the last, short batch
is empty gets an empty batch, which the sample-weighted gradient mean and
the metric sums count as nothing.

Batched `tf.data` datasets, `keras.utils.PyDataset`s and Python generators
are split round-robin by batch (rank r takes batches r, r+N, ...), padded
with empty batches so that every rank has the same number of steps.

Imported only once Keras and TensorFlow are.
"""

from __future__ import annotations

import itertools
import math
import types
from typing import Any

import numpy as np
import tensorflow as tf
from keras.src import tree
from keras.src.trainers.data_adapters import data_adapter_utils
from keras.src.trainers.data_adapters.array_data_adapter import (
    ArrayDataAdapter,
    can_convert_arrays,
)
from keras.src.trainers.data_adapters.py_dataset_adapter import PyDataset

from transparent_dist import collectives, sharding, world
from transparent_dist.failures import CollectiveError


class InputError(CollectiveError):
    """Bad training data, detected identically on every rank."""


def is_file_backed(x: Any) -> bool:
    """Whether `x` holds h5py datasets or netCDF4 variables (rows on disk)."""
    return any(
        type(leaf).__module__.split(".")[0] in ("h5py", "netCDF4") for leaf in tree.flatten(x)
    )


def kind_of(x: Any) -> str:
    """'file', 'dataset', 'pydataset', 'generator', 'arrays' or 'other'."""
    if x is not None and not isinstance(x, (tf.data.Dataset, PyDataset)) and is_file_backed(x):
        return "file"
    if isinstance(x, tf.data.Dataset):
        return "dataset"
    if isinstance(x, PyDataset):
        return "pydataset"
    if isinstance(x, types.GeneratorType) or (
        hasattr(x, "__next__") and hasattr(x, "__iter__") and not hasattr(x, "shape")
    ):
        return "generator"
    if x is not None and can_convert_arrays(x):
        return "arrays"
    return "other"


def _empty_like(batch: Any) -> Any:
    """A batch of the same structure with zero rows."""
    return tree.map_structure(lambda a: a[:0], batch)


# ---------------------------------------------------------------- arrays


def pack_arrays(x: Any, y: Any = None, sample_weight: Any = None) -> tuple[Any, int]:
    """`(inputs, num_samples)` of array data, checked like Keras checks it."""
    inputs = tree.lists_to_tuples(data_adapter_utils.pack_x_y_sample_weight(x, y, sample_weight))
    data_adapter_utils.check_data_cardinality(inputs)
    leaves = [a for a in tree.flatten(inputs) if a is not None]
    return inputs, int(leaves[0].shape[0])


def check_enough_samples(n: int, what: str) -> None:
    size = world.get().size
    if n < size:
        raise InputError(
            f"transparent_dist: {what} has {n} samples, fewer than the {size} "
            f"ranks of this job; every rank needs at least one sample"
        )


def _local_block(indices: tf.Tensor, rank: int, size: int) -> tf.Tensor:
    """This rank's contiguous block of a global batch of indices (the rule
    of `sharding.shard_range`, in graph ops)."""
    count = tf.shape(indices, out_type=tf.int64)[0]
    base, extra = count // size, count % size
    start = rank * base + tf.minimum(tf.constant(rank, tf.int64), extra)
    stop = start + base + tf.cast(rank < extra, tf.int64)
    return indices[start:stop]


def array_batches(
    inputs: Any,
    num_samples: int,
    global_batch: int,
    shuffle: Any,
    rank: int,
    size: int,
) -> tuple[tf.data.Dataset, int]:
    """`(dataset of this rank's local batches, steps per epoch)`."""
    steps = sharding.steps_for(num_samples, global_batch)
    # Keras's own adapter over the indices 0..n-1 draws the same global batch
    # order (and shuffle permutation, for a given TF seed) as plain fit would.
    indices = ArrayDataAdapter(
        np.arange(num_samples, dtype=np.int64), batch_size=global_batch, shuffle=shuffle
    ).get_tf_dataset()
    local_indices = indices.map(lambda i: _local_block(i, rank, size))
    tensors = tree.map_structure(
        lambda a: a if tf.is_tensor(a) else tf.convert_to_tensor(np.asarray(a)), inputs
    )
    data = tf.data.Dataset.zip((local_indices, tf.data.Dataset.from_tensors(tensors).repeat()))
    batches = data.map(
        lambda i, d: tree.map_structure(lambda a: tf.gather(a, i, axis=0), d),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    options = tf.data.Options()
    options.experimental_optimization.apply_default_optimizations = False
    if shuffle:
        options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    batches = batches.with_options(options).prefetch(tf.data.AUTOTUNE)
    return batches.apply(tf.data.experimental.assert_cardinality(steps)), steps


def array_block(inputs: Any, num_samples: int, rank: int, size: int) -> Any:
    """This rank's contiguous block of every array (for `predict`)."""
    start, stop = sharding.shard_range(num_samples, rank, size)
    return tree.map_structure(lambda a: a[start:stop], inputs)


# ---------------------------------------------------------------- files


def _read_rows(leaf: Any, start: int, stop: int) -> np.ndarray:
    # netCDF4 variables hand out masked arrays; the data is what we want.
    return np.asarray(np.ma.getdata(leaf[start:stop]))


def file_batches(
    inputs: Any,
    num_samples: int,
    global_batch: int,
    shuffle: bool,
    seed: int,
    rank: int,
    size: int,
    contiguous: bool = False,
) -> tf.data.Dataset:
    """This rank's rows of h5py datasets / netCDF4 variables (or arrays),
    streamed batch by batch, never loaded whole.

    The layout is the one of in-memory arrays: global batch k is rows
    `[k*B, (k+1)*B)` and this rank reads its contiguous piece of it (one
    hyperslab per step), so without shuffling the result equals plain Keras
    on the same arrays with batch size B. A background thread reads ahead
    (`prefetch`), so reading overlaps the training step. With `shuffle`,
    each epoch visits the global batches in a new order (drawn from `seed`,
    which must be equal on all ranks) and permutes the rows within each
    piece: every row once per epoch, and reads stay contiguous.

    With `contiguous=True` (for `predict`, whose results are gathered in
    rank order) this rank reads its block `shard_range(num_samples)` in
    batches of `global_batch // size`, ending with empty batches if its
    block needs fewer steps than the largest.
    """
    steps = sharding.steps_for(num_samples, global_batch)
    if contiguous:
        local_batch = max(1, global_batch // size)
        block_start, block_stop = sharding.shard_range(num_samples, rank, size)
        steps = sharding.steps_for(math.ceil(num_samples / size), local_batch)
    leaves = tree.flatten(inputs)
    spec = tuple(
        tf.TensorSpec((None, *leaf.shape[1:]), tf.as_dtype(np.dtype(leaf.dtype))) for leaf in leaves
    )
    epochs = itertools.count()

    def piece(step: int) -> tuple[int, int]:
        if contiguous:
            first = min(block_start + step * local_batch, block_stop)
            return first, min(first + local_batch, block_stop)
        first = step * global_batch
        start, stop = sharding.shard_range(min(global_batch, num_samples - first), rank, size)
        return first + start, first + stop

    def generate():
        epoch = next(epochs)
        order = np.arange(steps)
        if shuffle:
            order = np.random.default_rng([seed, epoch]).permutation(steps)
            local = np.random.default_rng([seed, epoch, rank])
        for step in order:
            a, b = piece(int(step))
            arrays = [_read_rows(leaf, a, b) for leaf in leaves]
            if shuffle:
                permutation = local.permutation(b - a)
                arrays = [x[permutation] for x in arrays]
            yield tuple(arrays)

    dataset = tf.data.Dataset.from_generator(generate, output_signature=spec)
    dataset = dataset.map(lambda *t: tree.pack_sequence_as(inputs, list(t))).prefetch(2)
    return dataset.apply(tf.data.experimental.assert_cardinality(steps))


# ---------------------------------------------------------------- datasets


def _empty_from_spec(spec: Any) -> Any:
    return tf.nest.map_structure(
        lambda s: tf.zeros([0] + [d or 0 for d in s.shape.as_list()[1:]], s.dtype), spec
    )


def _unpacked(fn):
    """Adapts `fn(element)` to tf.data's habit of unpacking tuples."""
    return lambda *args: fn(args[0] if len(args) == 1 else args)


def dataset_batches(dataset: tf.data.Dataset, rank: int, size: int) -> tf.data.Dataset:
    """Round-robin batches of a batched dataset, padded to equal steps."""
    w = world.get()
    cardinality = int(dataset.cardinality())
    if cardinality == tf.data.INFINITE_CARDINALITY:
        return dataset.shard(size, rank)
    if cardinality == tf.data.UNKNOWN_CARDINALITY:
        return _agreeing(dataset.shard(size, rank), w.data_comm)
    collectives.check_agreement("the number of batches in the dataset", cardinality, w.comm)
    if cardinality == 0:
        raise InputError("transparent_dist: the dataset is empty")
    steps = math.ceil(cardinality / size)
    local = dataset.shard(size, rank)
    if sharding.round_robin_count(cardinality, rank, size) < steps:
        local = local.concatenate(dataset.take(1).map(_unpacked(_empty_like)))
    return local.apply(tf.data.experimental.assert_cardinality(steps))


def dataset_block(dataset: tf.data.Dataset, rank: int, size: int) -> tf.data.Dataset | None:
    """This rank's contiguous run of batches (for `predict`), or None when
    the dataset's length is unknown."""
    cardinality = int(dataset.cardinality())
    if cardinality < 0:
        return None
    start, stop = sharding.shard_range(cardinality, rank, size)
    return dataset.skip(start).take(stop - start)


def _agreeing(local: tf.data.Dataset, comm: Any) -> tf.data.Dataset:
    """Batches of `local` until every rank has run out; a rank that ran out
    earlier yields empty batches meanwhile. One tiny allreduce per batch, on
    the data communicator (this runs on a tf.data thread)."""
    from mpi4py import MPI

    spec = local.element_spec

    def generate():
        template = None
        iterator = iter(local)
        while True:
            try:
                element = next(iterator)
            except StopIteration:
                element = None
            flag = np.array([element is not None], np.int32)
            comm.Allreduce(MPI.IN_PLACE, flag, op=MPI.MAX)
            if not flag[0]:
                return
            if element is not None:
                template = element
                yield element
            elif template is not None:
                yield _empty_like(template)
            else:
                yield _empty_from_spec(spec)

    return tf.data.Dataset.from_generator(generate, output_signature=spec)


# ---------------------------------------------------------------- PyDataset


class _PyDatasetPart(PyDataset):
    """Rank `rank`'s batches of a PyDataset: round-robin (`contiguous=False`,
    training) or one contiguous run (`contiguous=True`, predict)."""

    def __init__(self, inner: PyDataset, rank: int, size: int, contiguous: bool) -> None:
        super().__init__(
            workers=inner.workers,
            use_multiprocessing=inner.use_multiprocessing,
            max_queue_size=inner.max_queue_size,
        )
        self.inner, self.rank, self.size = inner, rank, size
        total = inner.num_batches
        self._total = total
        self._start = None
        if total is None:
            self._len = None
        elif contiguous:
            self._start, stop = sharding.shard_range(total, rank, size)
            self._len = stop - self._start
        else:
            self._len = math.ceil(total / size)

    @property
    def num_batches(self) -> int | None:
        return self._len

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> Any:
        if self._len is not None and self._start is not None:
            return self.inner[self._start + index]
        position = index * self.size + self.rank
        if self._total is None or position < self._total:
            return self.inner[position]
        # Past the end on this rank only: an empty batch keeps the steps equal.
        return _empty_like(self.inner[index * self.size])

    def on_epoch_begin(self) -> None:
        self.inner.on_epoch_begin()

    def on_epoch_end(self) -> None:
        self.inner.on_epoch_end()


def pydataset_part(dataset: PyDataset, rank: int, size: int, contiguous: bool = False) -> PyDataset:
    collectives.check_agreement(
        "the number of batches of the PyDataset", dataset.num_batches, world.get().comm
    )
    if dataset.num_batches == 0:
        raise InputError("transparent_dist: the PyDataset is empty")
    return _PyDatasetPart(dataset, rank, size, contiguous)


# ---------------------------------------------------------------- generators


def generator_batches(generator: Any, rank: int, size: int) -> Any:
    """Round-robin items of a generator that every rank runs in full (a
    generator cannot skip items). The last, incomplete round gives empty
    batches to the ranks it does not reach."""

    def local():
        group = []
        for item in generator:
            group.append(item)
            if len(group) == size:
                yield group[rank]
                group = []
        if group:
            yield group[rank] if rank < len(group) else _empty_like(group[0])

    return local()

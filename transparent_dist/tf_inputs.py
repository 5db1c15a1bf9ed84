"""This rank's part of training data, as `tf.data` pipelines: the
framework-neutral half of the sharding, used for Keras 3 (`keras_inputs`)
and tf_keras (`patches/tf_keras.py`) alike.

```python
import numpy as np
import tensorflow as tf
from transparent_dist import tf_inputs
ds = tf.data.Dataset.from_tensor_slices(np.arange(10.0)).batch(2)
mine = tf_inputs.dataset_batches(ds, rank=0, size=1)
```

In-memory arrays become a `tf.data.Dataset` of this rank's local batches:
global batch k is the k-th batch that the framework would take with batch
size N*b (the index order comes from the framework's own array adapter, so
the `shuffle` permutation is its own too), and each rank gathers its
contiguous block of it (`sharding.shard_range` of the batch). Every rank
runs the same number of steps; a rank whose block of the last, short batch
is empty gets an empty batch, which the sample-weighted gradient mean and
the metric sums count as nothing.

Batched `tf.data` datasets and Python generators are split round-robin by
batch (rank r takes batches r, r+N, ...), padded with empty batches so that
every rank has the same number of steps. h5py datasets and netCDF4
variables are streamed (`file_batches`).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tensorflow as tf

from transparent_dist import collectives, config, sharding, world
from transparent_dist.failures import CollectiveError


class InputError(CollectiveError):
    """Bad training data, detected identically on every rank."""


def is_file_backed(x: Any) -> bool:
    """Whether `x` holds h5py datasets or netCDF4 variables (rows on disk)."""
    return any(
        type(leaf).__module__.split(".")[0] in ("h5py", "netCDF4") for leaf in tf.nest.flatten(x)
    )


def _empty_like(batch: Any) -> Any:
    """A batch of the same structure with zero rows."""
    return tf.nest.map_structure(lambda a: a[:0], batch)


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


DEFAULT_BATCH_SIZE = 32  # Keras's own default


def global_batch(batch_size: int | None) -> int:
    """The global batch for a `batch_size` argument: N times it, or itself
    with TD_BATCH_SIZE=global."""
    b = batch_size or DEFAULT_BATCH_SIZE
    if config.SETTINGS.batch_size == "global":
        return b
    return b * world.get().size


@contextlib.contextmanager
def common_shuffle_seed() -> Iterator[None]:
    """Makes the TF global seed equal on all ranks while an index pipeline
    is built, so every rank draws the same permutation. A seed the script
    set alike everywhere is used as is: then the permutation is the one the
    framework alone draws."""
    from tensorflow.python.eager import context

    w = world.get()
    seed = context.global_seed()
    if w.size == 1:
        yield
        return
    seeds = w.comm.allgather(seed)
    if seed is not None and all(s == seed for s in seeds):
        yield
        return
    common = w.comm.bcast(random.randrange(2**31) if w.is_root else None, root=0)
    tf.random.set_seed(common)
    try:
        yield
    finally:
        tf.random.set_seed(seed)


def agree_on_samples(num_samples: int, what: str) -> None:
    """Every rank holds the same number of samples of `what`, and enough for
    the ranks; else the same clear error on every rank."""
    collectives.check_agreement(f"the number of samples in {what}", num_samples, world.get().comm)
    check_enough_samples(num_samples, what)


def shard_arrays(
    inputs: Any,
    num_samples: int,
    batch_size: int | None,
    shuffle: Any,
    what: str,
    index_batches: Callable[[int, int, Any], tf.data.Dataset],
) -> tf.data.Dataset:
    """This rank's batches of in-memory arrays, for any framework:
    `index_batches(n, global_batch, shuffle)` is the framework's own global
    batch order. The ranks first agree on the number of samples."""
    w = world.get()
    agree_on_samples(num_samples, what)
    batch = global_batch(batch_size)
    with common_shuffle_seed() if shuffle else contextlib.nullcontext():
        dataset, _ = array_batches(
            inputs,
            num_samples,
            batch,
            shuffle,
            w.rank,
            w.size,
            index_batches(num_samples, batch, shuffle),
        )
    return dataset


def array_batches(
    inputs: Any,
    num_samples: int,
    global_batch: int,
    shuffle: Any,
    rank: int,
    size: int,
    indices: tf.data.Dataset,
) -> tuple[tf.data.Dataset, int]:
    """`(dataset of this rank's local batches, steps per epoch)`.

    `indices` yields the global batches of sample indices, in the order the
    framework itself would take them (see `keras_inputs.global_batch_indices`).
    """
    steps = sharding.steps_for(num_samples, global_batch)
    local_indices = indices.map(lambda i: _local_block(i, rank, size))
    tensors = tf.nest.map_structure(
        lambda a: a if tf.is_tensor(a) else tf.convert_to_tensor(np.asarray(a)), inputs
    )
    data = tf.data.Dataset.zip((local_indices, tf.data.Dataset.from_tensors(tensors).repeat()))
    batches = data.map(
        lambda i, d: tf.nest.map_structure(lambda a: tf.gather(a, i, axis=0), d),
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
    return tf.nest.map_structure(lambda a: a[start:stop], inputs)


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
    leaves = tf.nest.flatten(inputs)
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
    dataset = dataset.map(lambda *t: tf.nest.pack_sequence_as(inputs, list(t))).prefetch(2)
    return dataset.apply(tf.data.experimental.assert_cardinality(steps))


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

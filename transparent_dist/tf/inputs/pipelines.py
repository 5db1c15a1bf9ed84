"""This rank's part of training data, as `tf.data` pipelines, for any
framework: each function takes the data and the `ShardPlan`.

```python
import numpy as np
import tensorflow as tf
from transparent_dist.core.shard_plan import ShardPlan
from transparent_dist.tf.inputs import pipelines
ds = tf.data.Dataset.from_tensor_slices(np.arange(10.0)).batch(2)
mine = pipelines.dataset_batches(ds, ShardPlan(rank=0, size=1))
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
batch (rank r takes batches r, r+N, ...), the last partial round split by
rows, so that every rank has the same number of steps. Where the ranks do
not know the length up front (a dataset of unknown cardinality, a
generator) they agree once per round that every one of them still has
data. h5py datasets and netCDF4 variables are streamed (`file_batches`).

Every rank needs at least one sample in every step (an empty batch breaks
layers such as Conv1D and LSTM). Data too small for that is refused here,
with the reason; `evaluate` and `predict` take it whole on every rank
instead (`tf.inputs.fewer_than_ranks`).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tensorflow as tf

from transparent_dist.core import collectives, sharding, world
from transparent_dist.core.errors import CollectiveError
from transparent_dist.core.shard_plan import ShardPlan
from transparent_dist.tf.inputs import seeds

__all__ = [
    "agree_on_samples",
    "array_batches",
    "array_block",
    "balanced_rounds",
    "check_enough_samples",
    "dataset_batches",
    "dataset_block",
    "epoch_end",
    "file_batches",
    "generator_batches",
    "is_file_backed",
    "iterator_made",
    "joinable",
    "joined_rows",
    "num_rows",
    "rank_rows_batches",
    "read_on_demand",
    "reshuffles",
    "rows_of",
    "shard_arrays",
]


# The plugin's own tf.data functions are plain tensor code: traced as they
# are, without autograph's source conversion (~0.2 s per fit and rank,
# paid by every job's first fit).
_traced_as_is = tf.autograph.experimental.do_not_convert


def is_file_backed(x: Any) -> bool:
    """Whether `x` holds h5py datasets or netCDF4 variables (rows on disk)."""
    return any(
        type(leaf).__module__.split(".")[0] in ("h5py", "netCDF4") for leaf in tf.nest.flatten(x)
    )


def check_enough_samples(n: int, what: str, size: int | None = None) -> None:
    """The same clear error on every rank when `n` samples cannot give each
    of `size` ranks (default: all) one sample per step."""
    size = world.get().size if size is None else size
    if n < size:
        raise CollectiveError(
            f"transparent_dist: {what} has {n} sample(s), fewer than the {size} "
            f"ranks of this job: training gives every rank at least one sample in "
            f"every step. Use at least {size} samples or at most {max(n, 1)} rank(s)"
        )


def agree_on_samples(num_samples: int, what: str, size: int | None = None) -> None:
    """Every rank holds the same number of samples of `what`, and enough for
    `size` ranks (default: all; 1 for data every rank takes whole); else the
    same clear error on every rank."""
    collectives.check_agreement(f"the number of samples in {what}", num_samples, world.get().comm)
    check_enough_samples(num_samples, what, size)


def shard_arrays(
    inputs: Any,
    num_samples: int,
    plan: ShardPlan,
    what: str,
    index_batches: Callable[[int, int, Any], tf.data.Dataset],
) -> tf.data.Dataset:
    """This rank's batches of in-memory arrays, for any framework:
    `index_batches(n, global_batch, shuffle)` is the framework's own global
    batch order. The ranks first agree on the number of samples."""
    agree_on_samples(num_samples, what, plan.size)
    if not plan.shuffle:
        # The framework's order is then 0..n-1 in global batches: this
        # rank's rows of each are one slice, cut by one traced function
        # (the general path traces three per call, ~100 ms, which a script
        # that evaluates or predicts in a loop pays every call).
        return _sliced(inputs, num_samples, plan)
    with seeds.common_global_seed() if plan.shuffle else contextlib.nullcontext():
        dataset, _ = array_batches(
            inputs,
            num_samples,
            plan,
            index_batches(num_samples, plan.global_batch, plan.shuffle),
        )
    return dataset


def array_batches(
    inputs: Any, num_samples: int, plan: ShardPlan, indices: tf.data.Dataset
) -> tuple[tf.data.Dataset, int]:
    """`(dataset of this rank's local batches, steps per epoch)`.

    `indices` yields the global batches of sample indices, in the order the
    framework itself would take them (see `keras_inputs.global_batch_indices`).
    Global batch k is the k-th run of that order (`sharding.global_batch_sizes`:
    the framework's own batches, except that a last batch with fewer
    samples than ranks takes the missing ones from the batch before it, or
    merges with it),
    and this rank takes its `shard_range` of it.
    """
    starts, stops = _blocks(num_samples, plan)
    steps = len(starts)
    # One tensor per epoch holding the whole order, cut into this rank's blocks.
    order = indices.unbatch().batch(num_samples)
    local_indices = order.flat_map(
        _traced_as_is(
            lambda o: tf.data.Dataset.from_tensor_slices((starts, stops)).map(
                _traced_as_is(lambda a, b: o[a:b])
            )
        )
    )
    return _gathered(inputs, local_indices, steps, plan.shuffle), steps


def _blocks(num_samples: int, plan: ShardPlan) -> tuple[np.ndarray, np.ndarray]:
    """(starts, stops): this rank's rows of each global batch of 0..n-1."""
    sizes = sharding.global_batch_sizes(num_samples, plan.global_batch, plan.size)
    firsts = np.cumsum([0, *sizes[:-1]])
    blocks = [sharding.shard_range(n, plan.rank, plan.size) for n in sizes]
    starts = np.array([f + a for f, (a, _) in zip(firsts, blocks, strict=True)], np.int64)
    stops = np.array([f + b for f, (_, b) in zip(firsts, blocks, strict=True)], np.int64)
    return starts, stops


def _sliced(inputs: Any, num_samples: int, plan: ShardPlan) -> Any:
    """This rank's batches of `inputs` in order, without shuffling."""
    starts, stops = _blocks(num_samples, plan)
    tensors = tf.nest.map_structure(
        lambda a: a if tf.is_tensor(a) else tf.convert_to_tensor(np.asarray(a)), inputs
    )
    bounds = tf.data.Dataset.from_tensor_slices((starts, stops))
    data = tf.data.Dataset.zip((bounds, tf.data.Dataset.from_tensors(tensors).repeat()))
    batches = data.map(
        _traced_as_is(lambda b, d: tf.nest.map_structure(lambda a: a[b[0] : b[1]], d))
    )
    options = tf.data.Options()
    options.experimental_optimization.apply_default_optimizations = False
    batches = batches.with_options(options).prefetch(tf.data.AUTOTUNE)
    return batches.apply(tf.data.experimental.assert_cardinality(len(starts)))


def _gathered(inputs: Any, local_indices: tf.data.Dataset, steps: int, shuffle: Any) -> Any:
    """Batches of `inputs` (in-memory arrays) at each element of `local_indices`."""
    tensors = tf.nest.map_structure(
        lambda a: a if tf.is_tensor(a) else tf.convert_to_tensor(np.asarray(a)), inputs
    )
    data = tf.data.Dataset.zip((local_indices, tf.data.Dataset.from_tensors(tensors).repeat()))
    batches = data.map(
        _traced_as_is(lambda i, d: tf.nest.map_structure(lambda a: tf.gather(a, i, axis=0), d)),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    options = tf.data.Options()
    options.experimental_optimization.apply_default_optimizations = False
    if shuffle:
        options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    batches = batches.with_options(options).prefetch(tf.data.AUTOTUNE)
    return batches.apply(tf.data.experimental.assert_cardinality(steps))


def rank_rows_batches(inputs: Any, num_rows: int, plan: ShardPlan, what: str) -> tf.data.Dataset:
    """Batches of data that is already this rank's part (`sharding.RankRows`,
    from the readers of `transparent_dist.data`), used as it is: the ranks
    agree on a number of steps (enough for the largest part at the per-rank
    batch size), and each rank cuts its own rows into that many batches of
    near-equal size, so parts a few rows apart (a byte-split CSV) give equal
    steps and no empty batch. With `shuffle`, each rank permutes its rows
    anew every epoch."""
    w = world.get()
    counts = collectives.allgather_object(num_rows, w.comm)
    per_rank = max(1, plan.global_batch // w.size)
    steps = math.ceil(max(counts) / per_rank)
    short = [r for r, n in enumerate(counts) if n < steps]
    if short:
        raise CollectiveError(
            f"transparent_dist: {what} is already split by rank (rows per rank: {counts}); "
            f"rank {short[0]} holds {counts[short[0]]}, fewer than the {steps} steps "
            f"the largest part needs at {per_rank} per batch"
        )
    seed, epochs, rank, shuffle = plan.seed, itertools.count(), w.rank, plan.shuffle

    def generate():
        epoch = next(epochs)
        rng = np.random.default_rng([seed, epoch, rank])
        order = rng.permutation(num_rows) if shuffle else np.arange(num_rows)
        yield from np.array_split(order.astype(np.int64), steps)

    indices = tf.data.Dataset.from_generator(
        generate, output_signature=tf.TensorSpec([None], tf.int64)
    )
    return _gathered(inputs, indices, steps, False)


def array_block(inputs: Any, num_samples: int, plan: ShardPlan) -> Any:
    """This rank's contiguous block of every array (for `predict`)."""
    start, stop = sharding.shard_range(num_samples, plan.rank, plan.size)
    return tf.nest.map_structure(lambda a: a[start:stop], inputs)


def _read_rows(leaf: Any, start: int, stop: int) -> np.ndarray:
    # netCDF4 variables hand out masked arrays; the data is what we want.
    return np.asarray(np.ma.getdata(leaf[start:stop]))


def file_batches(
    inputs: Any, num_samples: int, plan: ShardPlan, contiguous: bool = False
) -> tf.data.Dataset:
    """This rank's rows of h5py datasets / netCDF4 variables (or arrays),
    streamed batch by batch, never loaded whole.

    The layout is the one of in-memory arrays: global batch k is rows
    `[k*B, (k+1)*B)` and this rank reads its contiguous piece of it (one
    hyperslab per step), so without shuffling the result equals plain Keras
    on the same arrays with batch size B. A background thread reads ahead
    (`prefetch`), so reading overlaps the training step. With `shuffle`,
    each epoch visits the global batches in a new order (drawn from the
    plan's seed, equal on all ranks) and permutes the rows within each
    piece: every row once per epoch, and reads stay contiguous.

    With `contiguous=True` (for `predict`, whose results are gathered in
    rank order) this rank reads its block `shard_range(num_samples)` in
    batches of `global_batch // size`, ending with empty batches if its
    block needs fewer steps than the largest.
    """
    global_batch, shuffle, seed = plan.global_batch, plan.shuffle, plan.seed
    rank, size = plan.rank, plan.size
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
    dataset = dataset.map(_traced_as_is(lambda *t: tf.nest.pack_sequence_as(inputs, list(t))))
    dataset = dataset.prefetch(2)
    return dataset.apply(tf.data.experimental.assert_cardinality(steps))


def num_rows(batch: Any) -> int:
    """The number of samples in a batch (its first leaf's length)."""
    leaf = tf.nest.flatten(batch)[0]
    if isinstance(leaf, tf.RaggedTensor):
        return int(leaf.nrows())
    if isinstance(leaf, tf.SparseTensor):
        return int(leaf.dense_shape[0])
    return int(leaf.shape[0])


def rows_of(batch: Any, start: int, stop: int) -> Any:
    """Rows `start:stop` of every leaf of a batch."""

    def cut(leaf: Any) -> Any:
        if leaf is None:  # a generator's (x, y, None)
            return None
        if isinstance(leaf, tf.SparseTensor):
            shape = tf.cast(leaf.dense_shape, tf.int64)
            begin = tf.concat([[start], tf.zeros_like(shape[1:])], 0)
            return tf.sparse.slice(leaf, begin, tf.concat([[stop - start], shape[1:]], 0))
        return leaf[start:stop]

    if start == 0 and stop == num_rows(batch):
        return batch
    return tf.nest.map_structure(cut, batch)


def balanced_rounds(
    batches: Iterator[Any],
    rank: int,
    size: int,
    agree: Callable[[bool], None] | None = None,
    what: str = "the dataset",
    round_size: int | None = None,
) -> Iterator[Any]:
    """This rank's batches of one pass over `batches`: batch `rank` of
    every full round of `size` batches, then its rows of the last, partial
    round (`sharding.last_steps`), so no rank ever gets an empty batch and
    every sample is used once. The source is read once per epoch on every
    rank, so a shuffling dataset shuffles alike everywhere. Holds at most
    one round of batches (two with `round_size`). `agree(has_round)` is
    called once per round and at the end, for sources whose length the
    ranks do not know up front.

    `round_size`: the ranks the batches were first dealt to, when a lost
    rank left fewer (`ShardPlan.round_size`). Each step is then the step
    those ranks took, its pieces joined and split by rows over the `size`
    ranks left (`joined_rows`): the same global batches, the same steps."""
    dealt = size if round_size is None else round_size
    if dealt == size:
        for (own,) in _global_steps(batches, size, [rank], agree, what):
            yield own
        return
    for pieces in _global_steps(batches, dealt, list(range(dealt)), agree, what):
        yield joined_rows(pieces, rank, size, what)


def _global_steps(
    batches: Iterator[Any],
    size: int,
    ranks: list[int],
    agree: Callable[[bool], None] | None,
    what: str,
) -> Iterator[list[Any]]:
    """Each step of one pass over `batches` dealt to `size` ranks: the
    batches of `ranks` in it, in that order (see `balanced_rounds`). Holds
    the round being read, and of the round before only the batches of
    `ranks` and its last."""
    pending = None  # (the batches of `ranks`, the last batch) of the last full round
    current: list[Any] = []
    for batch in batches:
        current.append(batch)
        if len(current) < size:
            continue
        if agree is not None:
            agree(True)
        if pending is not None:
            yield pending[0]
        pending, current = ([current[r] for r in ranks], current[-1]), []
    if agree is not None:
        agree(False)
        collectives.check_agreement(
            f"the number of batches of {what} after its last full round of {size}",
            len(current),
            world.get().data_comm,
        )
    own, last = pending if pending is not None else ([None] * len(ranks), None)
    ends = [epoch_end(own[i], last, current, r, size, what) for i, r in enumerate(ranks)]
    yield from (list(step) for step in zip(*ends, strict=True))


def joined_rows(pieces: list[Any], rank: int, size: int, what: str = "the dataset") -> Any:
    """Rank `rank`'s rows of `pieces` (one step's batches) joined, split
    over `size` ranks (`sharding.shard_range`). Batches whose shapes differ
    past their first dimension (padded to each batch's own length) cannot
    be joined: that ends the job with the reason, never a step of other
    samples."""

    def join(*leaves: Any) -> Any:
        if leaves[0] is None:  # a generator's (x, y, None)
            return None
        if all(isinstance(leaf, np.ndarray) for leaf in leaves):
            return np.concatenate(leaves)
        if isinstance(leaves[0], tf.SparseTensor):
            return tf.sparse.concat(0, list(leaves))
        return tf.concat(leaves, 0)

    try:
        joined = tf.nest.map_structure(join, *pieces)
    except (ValueError, tf.errors.InvalidArgumentError) as error:
        shapes = [[tuple(leaf.shape) for leaf in tf.nest.flatten(p)] for p in pieces]
        raise CollectiveError(
            f"transparent_dist: {what}: after the lost rank(s), the survivors keep each "
            f"step's samples by joining its {len(pieces)} batches and splitting them over "
            f"{size} ranks, but these batches cannot be joined (shapes {shapes}: "
            f"{type(error).__name__}). Batches of one shape (batch, not padded_batch to each "
            "batch's own length) can; or run with TD_ELASTIC=off and resume from a checkpoint"
        ) from None
    start, stop = sharding.shard_range(num_rows(joined), rank, size)
    return rows_of(joined, start, stop)


def epoch_end(own: Any, last: Any, tail: list[Any], rank: int, size: int, what: str) -> list[Any]:
    """This rank's batches for the end of an epoch dealt round-robin: `own`
    and `last` are its batch and the last batch of the last full round
    (None if there was no full round), `tail` the batches after that round.
    Split by `sharding.last_steps`: no rank's batch is empty."""
    previous = None
    if own is not None:
        # Only this rank's and the last batch's row counts matter.
        previous = [0] * size
        previous[rank], previous[-1] = num_rows(own), num_rows(last)
    try:
        pieces = sharding.last_steps(previous, [num_rows(b) for b in tail], rank, size)
    except sharding.TooFewSamples as error:
        raise CollectiveError(
            f"transparent_dist: {what}: {error}; every rank needs at least one sample "
            "in every step (use fewer ranks, or drop_remainder=True)"
        ) from None
    first = size if own is not None else 0
    return [
        rows_of(own if index == rank else last, start, stop)
        if index < first
        else rows_of(tail[index - first], start, stop)
        for index, start, stop in pieces
    ]


def _round_agreement(comm: Any, what: str) -> Callable[[bool], None]:
    """A check, once per round, that every rank's source still has data:
    ranks whose datasets differ in length stop with an error instead of
    waiting for each other. One tiny allreduce per round, on the data
    communicator (this runs on a tf.data thread)."""

    def agree(has_round: bool) -> None:
        flags = np.array([int(has_round), -int(has_round)], np.int32)
        collectives.allreduce_in_place(flags, comm, "max", "agreement check")
        if flags[0] != -flags[1]:
            raise CollectiveError(
                f"transparent_dist: {what} has a different number of batches on "
                "different ranks; every rank must see the same data"
            )

    return agree


def _any_batch_size(spec: Any) -> Any:
    def relax(s: Any) -> Any:
        if isinstance(s, tf.TensorSpec) and s.shape.rank:
            return tf.TensorSpec([None, *s.shape[1:]], s.dtype, s.name)
        return s

    return tf.nest.map_structure(relax, spec)


# A dataset `dataset_batches` made -> what it does when an iterator of it
# is made (counts it: `iterator_made`).
_ON_ITER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def iterator_made(dataset: Any) -> None:
    """Called as an iterator of `dataset` is made (the patched
    `Dataset.__iter__`): a dataset `dataset_batches` made counts its
    iterators, so that it draws the orders plain Keras draws."""
    try:
        on_iter = _ON_ITER.get(dataset)
    except TypeError:  # a dataset kind that cannot be a weak key: not ours
        return
    if on_iter is not None:
        on_iter()


def joinable(spec: Any) -> bool:
    """Whether batches of element spec `spec` can be joined along their
    first dimension (`joined_rows`): every dimension past it fixed."""
    leaves = tf.nest.flatten(spec)
    return all(
        not isinstance(leaf, (tf.TensorSpec, tf.SparseTensorSpec, tf.RaggedTensorSpec))
        or leaf.shape.rank is not None
        and (isinstance(leaf, tf.RaggedTensorSpec) or leaf.shape[1:].is_fully_defined())
        for leaf in leaves
    )


def reshuffles(dataset: tf.data.Dataset) -> bool:
    """Whether `dataset`, or a dataset it is made from, shuffles anew on
    each pass (`shuffle(..., reshuffle_each_iteration=True)`, the default):
    each iterator made of it draws another order. (A shuffle inside a
    function it maps or interleaves is not seen.)"""
    seen, pending = set(), [dataset]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if getattr(current, "_reshuffle_each_iteration", False) is True:
            return True
        try:
            pending.extend(current._inputs())
        except (AttributeError, NotImplementedError, TypeError):
            continue
    return False


def dataset_batches(dataset: tf.data.Dataset, plan: ShardPlan) -> tf.data.Dataset:
    """Round-robin batches of a batched dataset, the last partial round
    split by rows (`balanced_rounds`): equal steps on every rank, no
    empty batch, every sample once per epoch."""
    w, rank, size, dealt = world.get(), plan.rank, plan.size, plan.round_size
    cardinality = int(dataset.cardinality())
    infinite = cardinality == tf.data.INFINITE_CARDINALITY
    if infinite and dealt == size:
        return dataset.shard(size, rank)
    known = cardinality != tf.data.UNKNOWN_CARDINALITY
    if known and not infinite:
        collectives.check_agreement("the number of batches in the dataset", cardinality, w.comm)
        if cardinality == 0:
            raise CollectiveError("transparent_dist: the dataset is empty")
        if cardinality % size == 0 and dealt == size:
            return dataset.shard(size, rank)
    agree = None if known else _round_agreement(w.data_comm, "the dataset")
    iterators = {"created": 0, "consumed": 0}

    def generate():
        # Every iterator made of a reshuffling dataset draws the next order.
        # Keras makes iterators it never reads (one at each epoch's end, for
        # the next epoch); ours only run this generator when read, so the
        # user's dataset makes up for the unread ones here, and the orders
        # drawn are the ones plain Keras draws.
        for _ in range(iterators["created"] - 1 - iterators["consumed"]):
            iter(dataset)
        iterators["consumed"] = max(iterators["created"], iterators["consumed"] + 1)
        yield from balanced_rounds(iter(dataset), rank, size, agree, round_size=dealt)

    balanced = tf.data.Dataset.from_generator(
        generate, output_signature=_any_batch_size(dataset.element_spec)
    )
    if infinite:
        balanced = balanced.repeat()  # a declared length, not a second pass
    elif known:
        balanced = balanced.apply(
            tf.data.experimental.assert_cardinality(math.ceil(cardinality / dealt))
        )
    else:
        balanced = read_on_demand(balanced)
    _ON_ITER[balanced] = lambda: iterators.update(created=iterators["created"] + 1)
    return balanced


def dataset_block(dataset: tf.data.Dataset, plan: ShardPlan) -> tf.data.Dataset | None:
    """This rank's contiguous run of batches (for `predict`), or None when
    every rank predicts all of it: its length is unknown, or it has fewer
    batches than there are ranks (a rank would have none)."""
    cardinality = int(dataset.cardinality())
    if cardinality < plan.size:
        return None
    start, stop = sharding.shard_range(cardinality, plan.rank, plan.size)
    return dataset.skip(start).take(stop - start)


def generator_batches(
    generator: Any,
    plan: ShardPlan,
    spec_of: Callable[[list], tuple[Any, Callable[[Any], Any]] | None] | None = None,
) -> Any:
    """Round-robin items of a generator that every rank runs in full (a
    generator cannot skip items), the last partial round split by rows
    (`balanced_rounds`). Its length is unknown, so the ranks agree once per
    round that each still has data, as for a dataset of unknown length: a
    generator that yields more batches on one rank than on another ends
    the job with that reason instead of leaving the longer rank waiting.

    On more than one rank the result is a `tf.data.Dataset` read on demand:
    the framework's own generator pipeline reads ahead on a thread of its
    own, which would take the next round's agreement on one rank after the
    last step while the other rank has gone on (a hang). Its element spec
    is the one the framework takes from the script's first two batches
    (`spec_of`: `ArrayFormat.generator_spec`; not this rank's batches), so
    a script that trains alone trains here. Without `spec_of` (or where it
    cannot describe the batches) the framework gets a generator."""
    what = "the generator"
    if plan.size == 1:
        return balanced_rounds(iter(generator), plan.rank, plan.size, None, what)
    generator = iter(generator)
    first = list(itertools.islice(generator, 2))
    agree = _round_agreement(world.get().data_comm, what)
    stream = balanced_rounds(itertools.chain(first, generator), plan.rank, plan.size, agree, what)
    described = spec_of(first) if spec_of is not None else None
    if described is None:
        # Keras names what is wrong with such batches, as it does alone.
        return (batch for batch in stream)
    spec, to_tf = described

    def generate():
        # Not `yield from`: closing an abandoned iterator must not close
        # the stream, which the next epoch's iterator goes on reading.
        for batch in stream:
            yield to_tf(batch)

    dataset = tf.data.Dataset.from_generator(generate, output_signature=spec)
    return read_on_demand(dataset)


def read_on_demand(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """`dataset` with no prefetch injected by tf.data: a pipeline that takes
    collectives must be read only when a step asks for a batch."""
    options = tf.data.Options()
    options.experimental_optimization.inject_prefetch = False
    return dataset.with_options(options)

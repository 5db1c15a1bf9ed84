"""Where data is sharded: the input of a call, classified once, split by
one `ShardPlan`.

```python
from transparent_dist.tf import inputs
data = inputs.classify(np.zeros((100, 4)), np.zeros(100), None, inputs.PLAIN_ARRAYS)
data.kind          # 'arrays'
data.num_samples   # 100
```

`classify` looks at the data once (`Data`); `for_training` and
`for_prediction` turn it into this rank's part with a `ShardPlan`:

| kind       | training (`fit`, `evaluate`)            | `predict` (gathered in rank order) |
|------------|-----------------------------------------|------------------------------------|
| arrays     | global batch k = the framework's k-th batch of N*b, this rank's block of it | this rank's block of rows |
| rank rows  | used as they are (`transparent_dist.data` readers) | used as they are, not gathered |
| file       | h5py / netCDF4 rows streamed, same layout as arrays | this rank's block, streamed |
| dataset    | round-robin batches, last round split by rows | a contiguous run of batches |
| sequence   | a Keras `PyDataset`, round-robin by batch | a contiguous run of batches |
| generator  | round-robin items                       | not split |
| other      | not split (said once)                   | not split |

Fewer samples than ranks: an empty batch breaks layers (Conv1D, LSTM), so
no rank is ever given one. `predict` and `evaluate` (fit's validation too)
do not split an input with fewer rows than ranks (datasets, sequences and
generators: fewer batches, `fewer_than_ranks`): every rank computes all of
it itself, one process's batches (`whole_plan`), which costs nothing worth
sharing; `predict` gathers nothing, and `evaluate` counts rank 0's metric
states only (the framework's `root_counts`). Training needs a sample on
every rank in every step and says so.

What a framework contributes (its array packing and batch order, its
sequence class) comes in an `ArrayFormat`.
"""

from __future__ import annotations

import dataclasses
import itertools
import types
from collections.abc import Callable
from typing import Any

import tensorflow as tf

from transparent_dist.core import collectives, log, sharding, world
from transparent_dist.core.shard_plan import ShardPlan, global_batch
from transparent_dist.tf.inputs import pipelines, seeds
from transparent_dist.tf.inputs.pipelines import is_file_backed

__all__ = [
    "PLAIN_ARRAYS",
    "ArrayFormat",
    "Data",
    "ShardPlan",
    "classify",
    "fewer_than_ranks",
    "for_prediction",
    "for_training",
    "global_batch",
    "plan_for",
    "whole_plan",
]


def _plain_pack(x: Any, y: Any = None, sample_weight: Any = None) -> tuple[Any, int]:
    inputs = tuple(a for a in (x, y, sample_weight) if a is not None)
    inputs = inputs[0] if len(inputs) == 1 else inputs
    return inputs, int(tf.nest.flatten(inputs)[0].shape[0])


def _plain_order(n: int, global_batch: int, shuffle: Any) -> tf.data.Dataset:
    order = tf.data.Dataset.range(n)
    if shuffle:
        order = order.shuffle(n, reshuffle_each_iteration=True)
    return order.batch(global_batch)


@dataclasses.dataclass(frozen=True)
class ArrayFormat:
    """What a framework decides about its data.

    Args:
        is_arrays: whether `x` is in-memory arrays it accepts.
        pack: `(x, y, sample_weight) -> (inputs, num_samples)`, checked as
            the framework checks them.
        index_batches: `(n, global_batch, shuffle) -> dataset of index
            batches` in the framework's own order (its shuffle included).
        sequence_class: its batch-indexed sequence class (Keras 3's
            `PyDataset`), or None.
        sequence_part: `(sequence, plan, contiguous) -> this rank's part`.
        generator_spec: `first batches -> (element spec, batch converter)`
            as the framework makes them for a generator, or None (then a
            generator is handed to the framework as a generator).
    """

    is_arrays: Callable[[Any], bool]
    pack: Callable[..., tuple[Any, int]] = _plain_pack
    index_batches: Callable[[int, int, Any], tf.data.Dataset] = _plain_order
    sequence_class: type | None = None
    sequence_part: Callable[..., Any] | None = None
    generator_spec: Callable[[list], tuple[Any, Callable[[Any], Any]] | None] | None = None


def _has_shape(x: Any) -> bool:
    leaves = tf.nest.flatten(x)
    return bool(leaves) and all(hasattr(a, "shape") and hasattr(a, "__getitem__") for a in leaves)


PLAIN_ARRAYS = ArrayFormat(is_arrays=lambda x: not isinstance(x, tf.data.Dataset) and _has_shape(x))


@dataclasses.dataclass
class Data:
    """One call's input, classified once.

    Attributes:
        kind: 'arrays', 'rank rows', 'file', 'dataset', 'sequence',
            'generator' or 'other'.
        x, y, sample_weight: as the script passed them.
        format: the framework's `ArrayFormat`.
    """

    kind: str
    x: Any
    y: Any = None
    sample_weight: Any = None
    format: ArrayFormat = PLAIN_ARRAYS

    @property
    def num_samples(self) -> int | None:
        """Rows of arrays or files (None for streams)."""
        if self.kind not in ("arrays", "rank rows", "file"):
            return None
        return self.packed()[1]

    def packed(self) -> tuple[Any, int]:
        return self.format.pack(self.x, self.y, self.sample_weight)

    @property
    def in_pipeline(self) -> bool:
        """Whether our pipeline orders (and shuffles) it, not the framework."""
        return self.kind in ("arrays", "rank rows", "file")

    def progress_unit(self, batch_size: int | None) -> tuple[str, int] | None:
        """What one training step consumes, for a checkpoint's accounting:
        ("samples", global batch) for arrays and files (global batch k is
        the same samples at any rank count), ("batches", N) for datasets,
        sequences and generators (a batch per rank); None otherwise."""
        if self.kind in ("arrays", "file"):
            return ("samples", global_batch(batch_size))
        if self.kind in ("dataset", "sequence", "generator"):
            return ("batches", world.get().size)
        return None


def classify(x: Any, y: Any, sample_weight: Any, fmt: ArrayFormat = PLAIN_ARRAYS) -> Data:
    """The kind of `x` (with its targets and weights)."""

    def data(kind: str) -> Data:
        return Data(kind, x, y, sample_weight, fmt)

    sequence = fmt.sequence_class
    if x is None:
        return data("other")
    if isinstance(x, tf.data.Dataset):
        return data("dataset")
    if sequence is not None and isinstance(x, sequence):
        return data("sequence")
    if is_file_backed(x):
        return data("file")
    if isinstance(x, types.GeneratorType) or (
        hasattr(x, "__next__") and hasattr(x, "__iter__") and not hasattr(x, "shape")
    ):
        return data("generator")
    if fmt.is_arrays(x):
        if sharding.holds_rank_rows(x, y, sample_weight):
            return data("rank rows")
        return data("arrays")
    return data("other")


def plan_for(batch_size: int | None, shuffle: Any = False) -> ShardPlan:
    """This rank's `ShardPlan` for a call (the seed agreed here)."""
    return ShardPlan.for_call(batch_size, shuffle, seeds.agreed_seed())


def whole_plan(batch_size: int | None) -> ShardPlan:
    """The plan of a call every rank makes on all of the data itself, in
    the batches one process takes with `batch_size`."""
    return plan_for(batch_size).whole()


def fewer_than_ranks(data: Data, what: str) -> tuple[Data, bool]:
    """`(data, whether it is smaller than the ranks)`: fewer samples (arrays,
    files) or fewer batches (datasets, sequences, generators) than ranks,
    the same answer on every rank. A generator's first batches, read to
    tell, are put back in front of it (the `Data` returned); a dataset of
    unknown length is read that far and started afresh."""
    size = world.get().size
    kind, count = data.kind, None
    if kind in ("arrays", "file"):
        count = data.packed()[1]
    elif kind == "dataset":
        count = int(data.x.cardinality())
        if count == tf.data.UNKNOWN_CARDINALITY:
            count = sum(1 for _ in data.x.take(size))
    elif kind == "sequence":
        count = getattr(data.x, "num_batches", None)
    elif kind == "generator":
        first = list(itertools.islice(data.x, size))
        data = dataclasses.replace(data, x=itertools.chain(first, data.x))
        count = len(first)
    collectives.check_agreement(f"the size of {what}", (kind, count), world.get().comm)
    return data, count is not None and 0 <= count < size


def _file_rows(data: Data, what: str, plan: ShardPlan, contiguous: bool) -> tf.data.Dataset:
    inputs, n = data.packed()
    pipelines.agree_on_samples(n, what, 1 if contiguous else plan.size)
    if contiguous and n < plan.size:
        # predict, fewer rows than ranks: every rank reads them all.
        plan = plan.whole()
    return pipelines.file_batches(inputs, n, plan, contiguous)


def for_training(
    data: Data, plan: ShardPlan, what: str, batch_size: int | None = None
) -> tuple[Any, Any, Any, Any]:
    """`(x, y, sample_weight, batch_size)` to hand the framework for this
    rank: our pipelines return batched datasets (y, weights and batch size
    then None); streams keep the script's y, weights and `batch_size`."""
    kind = data.kind
    log.debug(f"{what}: {kind} ({type(data.x).__name__}), sharded over {plan.size} ranks")
    if kind == "file":
        return _file_rows(data, what, plan, False), None, None, None
    if kind == "rank rows":
        inputs, n = data.packed()
        return pipelines.rank_rows_batches(inputs, n, plan, what), None, None, None
    if kind == "arrays":
        inputs, n = data.packed()
        dataset = pipelines.shard_arrays(inputs, n, plan, what, data.format.index_batches)
        return dataset, None, None, None
    if kind == "dataset":
        x = pipelines.dataset_batches(data.x, plan)
    elif kind == "sequence":
        x = data.format.sequence_part(data.x, plan, False)
    elif kind == "generator":
        x = pipelines.generator_batches(data.x, plan, data.format.generator_spec)
    else:
        log.info(
            f"{what} of type {type(data.x).__name__} is not sharded: every rank uses all of it"
        )
        x = data.x
    return x, data.y, data.sample_weight, batch_size


def for_prediction(data: Data, plan: ShardPlan, what: str) -> tuple[Any, bool]:
    """`(x for this rank, whether the outputs are gathered in rank order)`
    for `predict`. An input with fewer rows (datasets and sequences: fewer
    batches) than ranks is not split: every rank predicts all of it and
    nothing is gathered."""
    kind, x = data.kind, data.x
    split = plan.size > 1
    if kind == "file":
        return _file_rows(data, what, plan, True), split and data.packed()[1] >= plan.size
    if kind == "arrays":
        n = data.packed()[1]
        pipelines.agree_on_samples(n, what, 1)
        if n < plan.size:
            return x, False
        return pipelines.array_block(x, n, plan), split
    if kind == "dataset":
        block = pipelines.dataset_block(x, plan)
        return (x, False) if block is None else (block, split)
    if kind == "sequence":
        part = data.format.sequence_part(x, plan, True)
        return part, split and part is not x
    return x, False  # rank rows in, this rank's predictions out; streams as they are

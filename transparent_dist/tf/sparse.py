"""Sparse gradients (`tf.IndexedSlices`, from `Embedding` and other table
lookups) over all ranks, as one process computes them on the global batch.

```python
import tensorflow as tf
from transparent_dist.tf import sparse
slices = tf.IndexedSlices(tf.ones((2, 3)), tf.constant([0, 5]), tf.constant([10, 3]))
exchanged = sparse.exchange(slices, tf.constant(16.0, tf.float64))  # every rank
```

A lookup's gradient holds one row per index looked up, and Keras 3's Adam,
RMSprop, Adagrad... square each row before adding up the rows of one index.
So where one process has one row for a sum (g0 + g1), two rows g0 and g1
train differently ((g0 + g1)^2 is not g0^2 + g1^2). Two kinds of lookups:

- per sample (token ids from the data): one process's rows are every
  rank's rows, each scaled by its rank's share, concatenated ("gathered");
- shared by the batch (`positions = arange(maxlen)` in every keras-io
  transformer): one process looks up the same indices as each rank, each
  row a sum over the whole batch, so its rows are the ranks' rows added up
  ("summed"), the indices kept once.

Which kind a gradient is, part by part (a table looked up twice has a part
per lookup; `_parts`):

1. When the step is traced: a part whose indices depend on the step's
   data (their values, or their batch dimension) is per sample
   (`_depends_on_batch`): its rows are gathered.
2. Otherwise, at every step, each rank sends a 64-bit digest of the part's
   indices along with its sample count (the one small collective the
   gather needs anyway): the same indices on every rank are summed, else
   gathered.

Eager code has no graph to read, so step 2 alone decides there. tf_keras's
optimizers add up the rows of each index before updating, so either way
gives them one process's update.

Where the rule errs (Keras 3 optimizers only): per-sample ids that are the
same on every rank count as shared in eager code, and in a step traced
with a fixed batch size that makes them itself (`tf.zeros_like(x)` is then
folded into a constant); shared indices that differ between ranks
(`arange` of each rank's own padded length) are gathered.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from transparent_dist.core import collectives

__all__ = ["exchange"]

# Ops through which a traced step reads its data.
_DATA_OPS = frozenset(
    {
        "IteratorGetNext",
        "IteratorGetNextSync",
        "IteratorGetNextAsOptional",
        "OptionalGetValue",
        "MultiDeviceIteratorGetNextFromShard",
    }
)
# Dtypes of placeholders that are handles (variables, iterators), not data.
_HANDLES = frozenset({"resource", "variant"})


def exchange(
    slices: Any, weight: Any, divided: bool = False, summed: bool = False, comm: Any = None
) -> Any:
    """`slices` (this rank's sparse gradient) as one process's gradient on
    the global batch.

    Args:
        slices: a `tf.IndexedSlices`.
        weight: this rank's weight in the mean (its sample count, or 1.0),
            a float64 tensor.
        divided: the loss was divided by the number of ranks already.
        summed: one process's gradient is a sum over ranks, not a mean.
        comm: the communicator; the world's by default.

    Returns:
        A `tf.IndexedSlices` with the same dense shape and dtypes.
    """
    import tensorflow as tf

    if comm is None:
        from transparent_dist.core import world

        comm = world.get().comm
    parts = _parts(slices.values, slices.indices)
    shared = [not _depends_on_batch(indices) for _, indices in parts]
    size = collectives.size_of(comm)

    def run(step_weight, *arrays):
        count = len(parts)
        indices, values = arrays[:count], arrays[count:]
        record = np.zeros(1 + count, np.int64)
        record[0] = np.float64(step_weight).view(np.int64)
        for j in range(count):
            if shared[j]:
                record[1 + j] = _digest(indices[j])
        records = collectives.allgather_records(record, comm)
        share = _share(float(step_weight), records[:, 0].view(np.float64), divided, summed, size)
        out_indices, out_values = [], []
        for j in range(count):
            scaled = _scaled(values[j], share)
            if shared[j] and bool((records[:, 1 + j] == records[0, 1 + j]).all()):
                out_indices.append(indices[j])
                out_values.append(collectives.allreduce_sum_array(scaled, comm))
            else:
                out_indices.append(collectives.allgather_rows(indices[j], comm))
                out_values.append(collectives.allgather_rows(scaled, comm))
        return [*out_indices, *out_values]

    outputs = tf.numpy_function(
        run,
        [weight, *(i for _, i in parts), *(v for v, _ in parts)],
        [*(i.dtype for _, i in parts), *(v.dtype for v, _ in parts)],
        stateful=True,
        name="td_exchange_sparse_gradient",
    )
    count = len(parts)
    for tensor, (values, _) in zip(outputs[count:], parts, strict=True):
        tensor.set_shape([None, *values.shape[1:]])
    for tensor in outputs[:count]:
        tensor.set_shape([None])
    indices, values = outputs[:count], outputs[count:]
    if count > 1:
        indices, values = [tf.concat(indices, 0)], [tf.concat(values, 0)]
    return tf.IndexedSlices(values[0], indices[0], slices.dense_shape)


def _share(weight: float, weights: np.ndarray, divided: bool, summed: bool, size: int) -> float:
    """This rank's factor: its part of the global batch (sample-weighted),
    times N when the loss was divided by N already; 1 for a sum."""
    if summed:
        return 1.0
    total = float(weights.sum())
    share = weight / total if total > 0 else 0.0
    return share * size if divided else share


def _scaled(values: np.ndarray, share: float) -> np.ndarray:
    if share == 1.0:
        return values
    if share == 0.0:
        # A rank without samples: its gradient may be NaN (a mean over
        # nothing); it must contribute exactly zero.
        return np.zeros_like(values)
    return (values * np.asarray(share, values.dtype)).astype(values.dtype, copy=False)


def _digest(indices: np.ndarray) -> int:
    """64 bits of a hash of the indices (their length included)."""
    data = np.ascontiguousarray(indices).view(np.uint8)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def _parts(values: Any, indices: Any) -> list[tuple[Any, Any]]:
    """The (values, indices) of each lookup in a gradient: TensorFlow adds
    up the gradients of several lookups of one table by concatenating
    their rows (values and indices alike), which a traced graph shows."""
    import tensorflow as tf

    if not (tf.is_symbolic_tensor(values) and tf.is_symbolic_tensor(indices)):
        return [(values, indices)]
    v, i = values.op, indices.op
    if (
        v.type != "ConcatV2"
        or i.type != "ConcatV2"
        or len(v.inputs) != len(i.inputs)
        or tf.get_static_value(v.inputs[-1]) != 0
        or tf.get_static_value(i.inputs[-1]) != 0
    ):
        return [(values, indices)]
    parts = []
    for part_values, part_indices in zip(v.inputs[:-1], i.inputs[:-1], strict=True):
        if part_indices.shape.rank != 1 or not part_values.shape[:1].is_compatible_with(
            part_indices.shape
        ):
            return [(values, indices)]
        parts.extend(_parts(part_values, part_indices))
    return parts


def _depends_on_batch(indices: Any) -> bool:
    """Whether traced `indices` depend on the step's data: on its values, or
    on its batch dimension (a shape's other dimensions do not count, so
    `arange(tf.shape(x)[1])` does not). Unknown (eager tensors): False."""
    import tensorflow as tf

    if not tf.is_symbolic_tensor(indices):
        return False
    stack, seen = [indices.op], set()
    captures: dict[Any, dict[str, Any]] = {}
    while stack:
        op = stack.pop()
        if op.name in seen:
            continue
        seen.add(op.name)
        if _reads_data(op, captures):
            return True
        if op.type == "Rank":
            continue  # a rank never depends on the batch
        for position, source in enumerate(op.inputs):
            if position == 0 and _other_dimensions(op):
                continue
            stack.append(source.op)
    return False


def _reads_data(op: Any, captures: dict[Any, dict[str, Any]]) -> bool:
    """Whether `op` brings the step's data into the graph: a dataset read,
    or a placeholder (a traced function's argument, a TF1 feed) that is
    not a handle nor a value captured from eager code."""
    if op.type in _DATA_OPS:
        return True
    if not op.type.startswith("Placeholder"):
        return False
    if op.outputs[0].dtype.name in _HANDLES:
        return False
    graph = op.graph
    if graph not in captures:
        captures[graph] = {
            internal.op.name: external for external, internal in getattr(graph, "captures", ())
        }
    external = captures[graph].get(op.name)
    if external is None:
        return True
    import tensorflow as tf

    # A tensor captured from an enclosing graph may be data: not known here.
    return tf.is_symbolic_tensor(external)


def _other_dimensions(op: Any) -> bool:
    """Whether `op` is a slice of a `Shape` that leaves out dimension 0 (the
    batch): `tf.shape(x)[1]`, `tf.shape(x)[-1]` of a known rank, `[1:]`."""
    import tensorflow as tf

    if op.type != "StridedSlice" or op.inputs[0].op.type != "Shape":
        return False
    if op.get_attr("ellipsis_mask") or op.get_attr("new_axis_mask"):
        return False
    begin, strides = tf.get_static_value(op.inputs[1]), tf.get_static_value(op.inputs[3])
    rank = op.inputs[0].shape.num_elements()
    if begin is None or strides is None or rank is None or strides[0] <= 0:
        return False
    start = 0 if op.get_attr("begin_mask") & 1 else int(begin[0])
    start = start + rank if start < 0 else start
    return start >= 1

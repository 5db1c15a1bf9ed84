"""Where gradients are averaged across ranks.

```python
import tensorflow as tf
from transparent_dist.tf import exchange
grads = [tf.ones(3), None]
averaged = exchange.average(grads)   # same structure, None stays None
```

`average` is called by the optimizer patches (Keras 3, tf_keras) just before
an update, inside the traced train step: the gradients of one step go to MPI
in one op per bucket (`TD_FUSION_MB`) and dtype: the compiled op of
`native` (MPI called from C++, no Python on the hot path), or where that
cannot be built, a `tf.numpy_function` over `collectives`. Every rank issues
them at the same point of the same step, so the order of collectives is the
same everywhere.

With the native op the buckets overlap the backward pass: they are formed
in backprop order (the last layers' gradients, which exist first, in the
first bucket), each bucket's op starts as soon as its own gradients exist,
and its MPI work runs on the op's communication thread while TensorFlow
computes the earlier layers' gradients. The ops are chained in bucket order
(each waits for the one before: TensorFlow's automatic control dependencies
in a `tf.function`, explicit ones here for TF1 graphs), which is what keeps
the collectives in the same order on every rank; the step's sample counts
are negotiated once, by one op that runs at the start of the step.

The mean is weighted by each rank's number of samples in the step when the
train step told us (`step`, the `samples` of `core.step_state`), so a short
last batch split unevenly over the ranks still gives exactly the gradient
one process would compute on the whole global batch. Custom loops get the
plain mean. `arithmetic` is that rule, in one place, for every path.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

from transparent_dist.core import collectives, config, log, step_state, timeline, world
from transparent_dist.core.step_state import StepState
from transparent_dist.tf import backprop_order, host_op, native, sparse

__all__ = [
    "Arithmetic",
    "arithmetic",
    "average",
    "current_sample_count",
    "divide_loss",
    "divides_loss",
    "prepare",
    "reset",
    "step",
    "sum_over_ranks",
    "target_was_summed",
    "uses_native",
]

# What one bucket entry is: (index of the gradient, number of its block).
Unit = tuple[int, int]
# TD_COMPRESSION: the dtype float32 gradients travel in.
_COMPRESSED = {"fp16": "float16", "bf16": "bfloat16"}


@contextlib.contextmanager
def step(samples: Any) -> Iterator[StepState]:
    """Opens one train / test step in which this rank holds `samples`
    samples; `average` inside it weights this rank's gradient by them.
    Opened by the adapters' step wrappers.

    ```python
    with exchange.step(tf.shape(x)[0]):
        grads = exchange.average(grads)
    ```
    """
    with step_state.within(samples=samples, divided=False, summed=False) as state:
        yield state


def target_was_summed() -> None:
    """Declares that the next gradients to be averaged come from a target
    TensorFlow summed (a vector of per-sample losses given to
    `GradientTape.gradient`): one process's gradient is then the sum over
    the global batch, so `average` sums the ranks' gradients instead."""
    step_state.declare(summed=True)


# ------------------------------------------------------------ the arithmetic


@dataclasses.dataclass(frozen=True)
class Arithmetic:
    """How this rank's gradients of one step enter the exchange, and what
    comes out: sum_r(w_r * g_r) / sum_r(w_r), times N if `times_ranks`.

    Attributes:
        weight: this rank's w_r: its sample count in the step (a tensor
            while the step is traced), or None for 1 (a plain mean).
        divided: the loss was divided by N already (`divide_loss`): the
            gradients arrive as g_r / N, and where every rank has the same
            weight the native op sums them untouched (no pass over them).
        times_ranks: the target was summed (`target_was_summed`): one
            process's gradient is the sum over the global batch, so the
            plain mean is multiplied by N (a sum over the ranks).
    """

    weight: Any = None
    divided: bool = False
    times_ranks: bool = False


def arithmetic(state: StepState) -> Arithmetic:
    """The rule for a step in `state`, used by every exchange path (native
    op, numpy fallback, sparse gradients)."""
    if state.summed:
        # A sum over the global batch: every rank counts alike. Never with
        # a divided loss (only Keras's own train step divides, and its
        # loss is a scalar).
        return Arithmetic(times_ranks=True)
    return Arithmetic(weight=current_sample_count(state), divided=state.divided)


def divides_loss(state: StepState) -> bool:
    """Whether the loss of the step in `state` is divided by N before its
    gradients are taken (`divide_loss`): in a framework step, more than one
    rank, and only through the native op, whose `divided` mode takes the
    shares; the numpy path always gets whole gradients."""
    return state.samples is not None and world.get().size > 1 and uses_native()


def divide_loss(loss: Any) -> Any:
    """`loss` / N for the step being traced (inside `step`), when
    `divides_loss`; else `loss`. The step's gradients then arrive divided by
    N already, and on every step where the ranks have the same sample count
    the exchange sums them untouched: no pass over the gradients (it costs
    a third of a large model's exchange time here)."""
    if not divides_loss(step_state.current()):
        return loss
    step_state.declare(divided=True)
    return loss / world.get().size


def current_sample_count(state: StepState | None = None) -> Any:
    """This rank's sample count in the current step (or `state`'s), or None
    outside a framework train step (custom loops)."""
    count = (state or step_state.current()).samples
    if count is None:
        return None
    import tensorflow as tf

    # A tensor traced into another graph (a test step, an earlier trace)
    # must not leak into this one.
    if not tf.executing_eagerly() and not isinstance(count, (int, float)):
        graph = getattr(count, "graph", None)
        if graph is not None and graph is not tf.compat.v1.get_default_graph():
            return None
    return count


# ------------------------------------------------------------ the path

_PATH: dict[str, bool] = {}


def uses_native() -> bool:
    """Whether this process exchanges through the compiled op (`native`) or
    through `tf.numpy_function` over `collectives`: decided once, at the
    first exchange (or `prepare`), and the same for every later one.
    Collective on the first call."""
    if "native" not in _PATH:
        _PATH["native"] = native.load()
    return _PATH["native"]


def reset() -> None:
    """Forgets the path taken (`activation.reset`): the next exchange
    decides again, on every rank at once, as the first did."""
    _PATH.clear()


def prepare() -> None:
    """Decides the path now, on every rank at once (fit start): the native
    op's load is a collective and may compile, which must not happen inside
    the first step's trace."""
    if world.get().size > 1:
        uses_native()


def average(grads: Sequence[Any], state: StepState | None = None) -> list[Any]:
    """Sample-weighted mean of `grads` over all ranks (graph or eager).

    Args:
        grads: gradients; may hold None (left as is) and `tf.IndexedSlices`
            (sparse gradients: rows gathered or summed, `sparse.exchange`).
        state: the step's facts (`core.step_state`); by default the current
            ones, whose summed target is then used up.

    Returns:
        The averaged gradients, in the same structure and dtypes.
    """
    w = world.get()
    grads = list(grads)
    if w.size == 1:
        return grads
    import tensorflow as tf

    present = [i for i, g in enumerate(grads) if g is not None]
    if not present:
        return grads
    if state is None:
        state = step_state.current()
        if state.summed:
            step_state.declare(summed=False)  # one declaration per gradient call
    rule = arithmetic(state)
    weight = tf.cast(1.0 if rule.weight is None else rule.weight, tf.float64)
    totals = None
    if uses_native() and any(not isinstance(grads[i], tf.IndexedSlices) for i in present):
        # One round trip per step for every bucket's scale. Its only input
        # is the sample count, and it comes first in program order (before
        # the sparse exchange's collectives too), so it runs during the
        # forward pass, not between the gradients and their exchange.
        totals = native.negotiate(weight, count_samples=True)
    # Every collective of the step after the one before it (explicit for
    # TF1 graphs; a tf.function's automatic dependencies do the same): the
    # native op's thread and the sparse exchange's host ops share the
    # communicator, so they must never run at once.
    after: list[Any] = [] if totals is None else [totals]
    for i in [i for i in present if isinstance(grads[i], tf.IndexedSlices)]:
        with tf.control_dependencies(after):
            grads[i] = sparse.exchange(grads[i], weight, rule.divided, rule.times_ranks, w.comm)
        after = [grads[i].values]
    present = [i for i in present if not isinstance(grads[i], tf.IndexedSlices)]
    if not present:
        return grads
    dense = _units(grads, present)
    buckets = _buckets(list(dense), dense, config.SETTINGS.fusion_mb)
    log.debug(
        f"gradient exchange: {len(present)} tensors ({len(dense)} blocks) in {len(buckets)} "
        f"bucket(s), compression {config.SETTINGS.compression}"
    )
    out: dict[Unit, Any] = {}
    if totals is not None:
        for number, bucket in enumerate(buckets):
            after = _native_average(bucket, dense, out, weight, totals, after, number, rule)
    else:
        _numpy_average(buckets, dense, out, weight, w.comm)
    _join(out, grads)
    if rule.times_ranks:
        for i in present:
            grads[i] = grads[i] * tf.cast(w.size, grads[i].dtype)
    return grads


def _units(grads: list[Any], present: list[int]) -> dict[Unit, Any]:
    """What the exchange sends, in the order it sends it: each gradient of
    `present`, or each block of one that `backprop_order` computed in
    blocks, in the order they are computed. Backprop yields the last
    layers' gradients first: they go first, so their allreduce runs while
    the earlier layers' gradients are computed."""
    import tensorflow as tf

    units: dict[Unit, Any] = {}
    for i in reversed(present):
        for j, block in enumerate(backprop_order.pieces(grads[i]) or [grads[i]]):
            units[(i, j)] = tf.convert_to_tensor(block)
    return units


def _join(averaged: dict[Unit, Any], grads: list[Any]) -> None:
    """Puts the averaged units back into `grads`: a gradient sent in blocks
    is their join along rows, as `backprop_order` computed it."""
    import tensorflow as tf

    blocks: dict[int, list[Any]] = {}
    for i, j in sorted(averaged):
        blocks.setdefault(i, []).append(averaged[(i, j)])
    for i, parts in blocks.items():
        grads[i] = parts[0] if len(parts) == 1 else tf.concat(parts, axis=0)


def _native_average(
    bucket: list[Unit],
    dense: dict[Unit, Any],
    grads: dict[Unit, Any],
    weight: Any,
    totals: Any,
    after: list[Any],
    number: int,
    rule: Arithmetic,
) -> list[Any]:
    """Bucket `number` through the native op: one call per dtype, float
    dtypes as they are, anything else as float32, each call after the
    tensors `after` (the previous call's outputs). Returns this bucket's
    last outputs, for the next bucket to follow."""
    import tensorflow as tf

    groups = _by_dtype(bucket, lambda i: _native_dtype(dense[i].dtype.name))
    for name, members in groups.items():
        sent = [
            tf.cast(dense[i], name) if dense[i].dtype.name != name else dense[i] for i in members
        ]
        # Explicit in a TF1 graph (no automatic control dependencies there):
        # the op starts after the previous one ended, so the ops reach the
        # communication thread in bucket order on every rank.
        with tf.control_dependencies(after):
            averaged = native.allreduce(
                sent,
                weight,
                compression=config.SETTINGS.compression if name == "float32" else "none",
                divided=rule.divided,
                totals=totals,
                bucket=number,
            )
        _put_back(members, averaged, dense, grads)
        after = averaged
    return after


def _numpy_average(
    buckets: list[list[Unit]],
    dense: dict[Unit, Any],
    grads: dict[Unit, Any],
    weight: Any,
    comm: Any,
) -> None:
    """The buckets through `tf.numpy_function` over `collectives` (where the
    native op cannot be built)."""
    import tensorflow as tf

    compress = _COMPRESSED.get(config.SETTINGS.compression)

    def exchange(step_weight, *arrays):
        return collectives.allreduce_average(arrays, float(step_weight), comm)

    def exchange_and_count(step_weight, *arrays):
        timeline.STATS.samples += float(step_weight)  # once per step: the first bucket
        return exchange(step_weight, *arrays)

    for number, bucket in enumerate(buckets):
        sent = [dense[i] for i in bucket]
        if compress is not None:
            sent = [tf.cast(t, compress) if t.dtype == tf.float32 else t for t in sent]
        fn = exchange_and_count if number == 0 else exchange
        averaged = host_op.collective_op(fn, [weight, *sent], sent, "td_average_gradients")
        _put_back(bucket, averaged, dense, grads)


def _native_dtype(name: str) -> str:
    """The dtype a tensor of dtype `name` travels in through the native op."""
    return name if name in native.DTYPES else "float32"


def _by_dtype(indices: list[Any], dtype_of: Any) -> dict[str, list[Any]]:
    """`indices` grouped by `dtype_of(i)`, groups in first-seen order (the
    same on every rank, since every rank passes the same layout)."""
    groups: dict[str, list[Any]] = {}
    for i in indices:
        groups.setdefault(dtype_of(i), []).append(i)
    return groups


def _put_back(
    indices: list[Unit], results: list[Any], dense: dict[Unit, Any], grads: dict[Unit, Any]
) -> None:
    """Stores exchanged `results` in `grads`, in the gradients' own dtypes."""
    import tensorflow as tf

    for i, tensor in zip(indices, results, strict=True):
        grads[i] = tf.cast(tensor, dense[i].dtype) if tensor.dtype != dense[i].dtype else tensor


def _buckets(order: list[Unit], tensors: dict[Unit, Any], limit_mb: float) -> list[list[Unit]]:
    """Consecutive runs of `order` of at most `limit_mb` MB each (a tensor
    larger than that is a bucket of its own); one bucket when the limit is 0."""
    limit = limit_mb * 1e6
    buckets: list[list[int]] = [[]]
    size = 0
    for i in order:
        # A shape unknown at trace time counts as small: the bucket limit
        # is a tuning knob, and every rank traces the same shapes.
        nbytes = (tensors[i].shape.num_elements() or 1) * tensors[i].dtype.size
        if limit > 0 and buckets[-1] and size + nbytes > limit:
            buckets.append([])
            size = 0
        buckets[-1].append(i)
        size += nbytes
    return buckets


def sum_over_ranks(tensors: Sequence[Any]) -> list[Any]:
    """Element-wise sums over ranks of `tensors` (graph or eager): used for
    metric states, which are additive."""
    w = world.get()
    tensors = list(tensors)
    if w.size == 1 or not tensors:
        return tensors
    if uses_native() and all(t.dtype.name in native.DTYPES for t in tensors):
        import tensorflow as tf

        out: list[Any] = [None] * len(tensors)
        groups = _by_dtype(list(range(len(tensors))), lambda i: tensors[i].dtype.name)
        after: list[Any] = []
        for members in groups.values():
            with tf.control_dependencies(after):  # in order, as `average`'s buckets
                after = native.allreduce([tensors[i] for i in members], average=False)
            for i, tensor in zip(members, after, strict=True):
                out[i] = tensor
        return out
    comm = w.comm

    def exchange(*arrays):
        return collectives.allreduce_sum(arrays, comm)

    return host_op.collective_op(exchange, tensors, tensors, "td_sum_metric_states")

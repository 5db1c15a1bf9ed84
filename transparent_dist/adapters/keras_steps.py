"""What every Keras 3 train / test step does under N ranks, whoever wrote
the step: Keras's own `train_step` or a script's override.

```python
import keras
from transparent_dist.adapters import keras_steps
from transparent_dist.tf.backend import TENSORFLOW
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
model.compile("sgd", "mse", metrics=["mae"])
logs = keras_steps.global_metric_results(model.metrics, TENSORFLOW)   # {'loss': ..., 'mae': ...}
```

- The logs a step returns are made global, so callbacks that steer
  (`EarlyStopping`, `ReduceLROnPlateau`) decide alike on every rank. A log
  value that is a metric's `result()` (the keras-io pattern
  `{m.name: m.result() for m in self.metrics}`, and Keras's own
  `compute_metrics`) becomes that metric's result over the metric states
  summed over the ranks: exactly what one process computes. Any other
  floating-point value (a raw loss tensor, say) becomes its mean over the
  ranks weighted by their sample counts, which for a per-batch mean is the
  global batch's mean. One fused allreduce per step carries both.
- A `Mean` tracker given one value per step (keras-io's
  `loss_tracker.update_state(loss)`, Keras's per-output loss trackers)
  counts each rank's value once, as one process counts its global batch's
  once. In a step whose ranks hold different numbers of samples (the last,
  partial step of an epoch) each rank's value is weighted by its share of
  the step's samples, so the running mean is one process's: rank values
  m_r of n_r samples add N * sum(n_r m_r) / sum(n_r) to the summed total
  and N to the summed count. A rank with an empty batch (a dataset that
  yields one) adds nothing to the total, not the NaN a mean over no
  samples is.
- Where every rank evaluates the same data whole (fewer samples than
  ranks), only rank 0's metric states count (`counted_on_root_only`).
- Random draws from a `SeedGenerator` (dropout, a GAN's latent noise,
  `keras.random.*` without a seed) differ between ranks inside a step: one
  process with the global batch draws independent noise for every sample,
  and N ranks drawing the same noise would train a GAN on N copies of the
  same fakes. Draws with an integer seed (initializers, explicit stateless
  draws) stay as they are.

The exchanges and a batch's sample count go through the `Backend`; the
arithmetic around them is `keras.ops` where that is TensorFlow's op
itself, and TensorFlow's where Keras's op differs (its dtype promotion in
`where`, `not_equal`, `divide_no_nan`) or has no equal (`add_n`, a
traced graph's identity, `init_scope`): what a JAX or torch backend would
rewrite.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import keras
import tensorflow as tf
from keras import tree

from transparent_dist.core import step_state, unique, world
from transparent_dist.core.backend import Backend
from transparent_dist.tf import broadcast, exchange

__all__ = ["PLAIN", "SPLIT", "WHOLE", "counted_on_root_only", "global_metric_results", "wrap_step"]

# ------------------------------------------------------------ metric results


def _as_tensor(value: Any) -> Any:
    # A custom Metric may return a state variable itself; reading it here,
    # inside the scope that maps variables to values, is what makes the
    # result the global one.
    return tf.convert_to_tensor(value) if value is not None else value


def _result_from(metric: Any, values: list[Any]) -> Any:
    """`metric.result()` computed from `values` for its variables."""
    mapping = list(zip(metric.variables, values, strict=True))
    with keras.StatelessScope(state_mapping=mapping):
        return tree.map_structure(_as_tensor, metric.result())


_COUNTED: list[Any] = []


def _counted() -> Any:
    """A variable, read when a step runs: 1 where this rank's metric states
    count, 0 on the ranks other than 0 inside `counted_on_root_only`."""
    if not _COUNTED:
        with tf.init_scope():
            _COUNTED.append(tf.Variable(1.0, trainable=False, name="td_counted"))
    return _COUNTED[0]


def _counted_part(variable: Any, counted: Any) -> Any:
    """What `variable` (a metric state) adds to the sum over the ranks."""
    value = tf.convert_to_tensor(variable)
    return value * keras.ops.cast(counted, value.dtype)


@contextlib.contextmanager
def counted_on_root_only() -> Iterator[None]:
    """Within: every rank evaluates the same data whole (fewer samples
    than ranks, `tf.inputs.fewer_than_ranks`), so the metric results count
    rank 0's states only: one process's, not N times them. The steps'
    collectives stay as they are."""
    counted = _counted()
    counted.assign(1.0 if world.get().is_root else 0.0)
    try:
        yield
    finally:
        counted.assign(1.0)


def global_metric_results(metrics: list[Any], backend: Backend) -> dict[str, Any]:
    """The results of `metrics` over the ranks' summed states (summed by
    `backend`), keyed as Keras's `get_metrics_result` keys them."""
    metrics = unique.by_identity(list(metrics))
    variables = broadcast.metric_variables(metrics)
    counted = tf.convert_to_tensor(_counted())
    summed = backend.sum([_counted_part(v, counted) for v in variables])
    by_id = {id(v): s for v, s in zip(variables, summed, strict=True)}
    results: dict[str, Any] = {}
    for metric in metrics:
        result = _result_from(metric, [by_id[id(v)] for v in metric.variables])
        if isinstance(result, dict):
            results.update(result)
        else:
            results[metric.name] = result
    return results


@contextlib.contextmanager
def _overriding(metrics: list[Any], name: str, wrap: Any, only: Any = None) -> Iterator[None]:
    """Sets `wrap(metric, original)` as method `name` on each metric
    instance (once per metric, those `only` accepts, none already
    overridden) while the block runs; the class's method is back after."""
    wrapped = []
    for metric in unique.by_identity(list(metrics)):
        if name in vars(metric) or (only is not None and not only(metric)):
            continue
        object.__setattr__(metric, name, wrap(metric, getattr(metric, name)))
        wrapped.append(metric)
    try:
        yield
    finally:
        for metric in wrapped:
            vars(metric).pop(name, None)


@contextlib.contextmanager
def _recording_results(metrics: list[Any]) -> Iterator[dict[int, tuple[Any, Any, int]]]:
    """While a step is traced, remembers which tensors are which metric's
    `result()`: id(tensor) -> (tensor, metric, index among its leaves).
    The wrapper sits on each metric instance, so a script's own Metric
    subclasses are seen too."""
    recorded: dict[int, tuple[Any, Any, int]] = {}

    def wrap(metric: Any, original: Any) -> Any:
        def result():
            out = tree.map_structure(_as_tensor, original())
            for index, leaf in enumerate(tree.flatten(out)):
                recorded[id(leaf)] = (leaf, metric, index)
            return out

        return result

    with _overriding(metrics, "result", wrap):
        yield recorded


def _is_once_per_step(values: Any, sample_weight: Any) -> bool:
    """Whether `Mean.update_state(values, sample_weight)` adds one value for
    the whole batch: a single value, no weight. (Any weight, e.g. Keras's
    own tracker's batch size, makes the update count samples.)"""
    if sample_weight is not None:
        return False
    try:
        shape = tf.convert_to_tensor(values).shape
    except (TypeError, ValueError):  # ragged, sparse: per-sample values
        return False
    return shape.is_fully_defined() and shape.num_elements() == 1


@contextlib.contextmanager
def _recording_once_per_step(metrics: list[Any], count: Any) -> Iterator[dict[int, list[Any]]]:
    """While a step is traced, remembers the values given once per step to
    `Mean` trackers (`_is_once_per_step`): id(metric) -> [metric, values],
    and hands them on as 0 when this rank's batch is empty. A value given
    inside a branch or loop of the step (`tf.cond`, autograph's `if`) is
    left as it is: the exchange after the step cannot reach it."""
    recorded: dict[int, list[Any]] = {}

    def wrap(metric: Any, original: Any) -> Any:
        def update_state(values, sample_weight=None):
            if not _is_once_per_step(values, sample_weight):
                return original(values, sample_weight=sample_weight)
            value = keras.ops.reshape(keras.ops.cast(values, metric.dtype), [])
            if not tf.executing_eagerly() and value.graph is not count.graph:
                return original(values, sample_weight=sample_weight)
            value = tf.where(count > 0, value, keras.ops.zeros_like(value))
            recorded.setdefault(id(metric), [metric]).append(value)
            return original(value)

        return update_state

    def is_mean(metric: Any) -> bool:
        return type(metric).update_state is keras.metrics.Mean.update_state

    with _overriding(metrics, "update_state", wrap, only=is_mean):
        yield recorded


def _recorded_as(leaf: Any, recorded: dict) -> tuple[Any, int] | None:
    """(metric, index among its result's leaves) if `leaf` is a recorded
    metric result, else None."""
    entry = recorded.get(id(leaf))
    return entry[1:] if entry is not None and entry[0] is leaf else None


def _once_per_step_terms(once: dict[int, list[Any]], n: Any) -> list[Any]:
    """What the exchange sums for `_weigh_once_per_step`: per tracker given
    values once per step, their sum c and n * c (n: this rank's samples);
    then n * n and n."""
    terms = []
    for entry in once.values():
        c = tf.add_n(entry[1:])
        terms += [keras.ops.reshape(c, [1]), keras.ops.reshape(c * keras.ops.cast(n, c.dtype), [1])]
    return [*terms, keras.ops.reshape(n * n, [1]), keras.ops.reshape(n, [1])]


def _weigh_once_per_step(once: dict[int, list[Any]], summed: list[Any], n: Any) -> dict[int, Any]:
    """Weighs each rank's once-per-step values by its share n * N / T of
    the step's T samples when the ranks' sample counts differ: corrects
    this rank's tracker total in place, and returns id(total variable) ->
    the correction of its sum over the ranks (`summed`: the summed
    `_once_per_step_terms`). The counts are equal exactly when
    N * sum(n * n) == T * T; such steps are left untouched."""
    size = world.get().size
    total = summed[-1][0]
    uneven = tf.not_equal(size * summed[-2][0], total * total)
    corrections = {}
    for k, entry in enumerate(once.values()):
        metric, c = entry[0], tf.add_n(entry[1:])
        sum_c, sum_nc = summed[2 * k][0], summed[2 * k + 1][0]
        t = keras.ops.cast(total, c.dtype)
        share = tf.math.divide_no_nan(keras.ops.cast(n, c.dtype) * size, t)
        metric.total.assign_add(tf.where(uneven, (share - 1) * c, keras.ops.zeros_like(c)))
        fix = tf.math.divide_no_nan(size * sum_nc - t * sum_c, t)
        corrections[id(metric.total)] = tf.where(uneven, fix, keras.ops.zeros_like(fix))
    return corrections


def _global_logs(
    logs: Any, recorded: dict, count: Any, backend: Backend, once: dict | None = None
) -> Any:
    """`logs` with metric results replaced by global results and other
    floating-point values by their sample-weighted mean over ranks, in one
    fused exchange by `backend` (which also weighs `once`, the trackers given values
    once per step: `_weigh_once_per_step`). Where only rank 0's states
    count (`counted_on_root_only`), the others add nothing."""
    once = once or {}
    leaves = tree.flatten(logs)
    metrics, others = [], []
    for index, leaf in enumerate(leaves):
        if _recorded_as(leaf, recorded):
            metrics.append(_recorded_as(leaf, recorded)[0])
        elif keras.ops.is_tensor(leaf) and leaf.dtype.is_floating:
            others.append(index)
    metrics = unique.by_identity(metrics)
    variables = broadcast.metric_variables(metrics)
    n = keras.ops.cast(count, "float32")
    counted = tf.convert_to_tensor(_counted())
    weight = n * counted
    payload = [_counted_part(v, counted) for v in variables]
    # A rank whose batch counts for nothing adds 0, not 0 times a NaN.
    payload += [
        tf.where(weight > 0, keras.ops.cast(leaves[i], "float32") * weight, 0.0) for i in others
    ]
    terms = _once_per_step_terms(once, n) if once else []
    summed = backend.sum([*payload, *terms, keras.ops.reshape(weight, [1])])
    total = summed[-1][0]
    by_id = {id(v): s for v, s in zip(variables, summed[: len(variables)], strict=True)}
    if once:
        extra = summed[len(payload) : len(payload) + len(terms)]
        for key, fix in _weigh_once_per_step(once, extra, n).items():
            if key in by_id:
                by_id[key] = by_id[key] + keras.ops.cast(fix, by_id[key].dtype)
    results = {
        id(metric): tree.flatten(_result_from(metric, [by_id[id(v)] for v in metric.variables]))
        for metric in metrics
    }
    out = list(leaves)
    for index, leaf in enumerate(leaves):
        if _recorded_as(leaf, recorded):
            metric, position = _recorded_as(leaf, recorded)
            out[index] = results[id(metric)][position]
    for index, value in zip(others, summed[len(variables) : len(payload)], strict=True):
        out[index] = keras.ops.cast(value / total, leaves[index].dtype)
    return tree.pack_sequence_as(logs, out)


# ------------------------------------------------------------ the step


# How a step keeps XLA (`wrap_step`'s `xla`): not at all, its whole
# step function compiled (a test step: no exchange inside it), or split
# (Keras's own train step: compiled up to the optimizer's update).
PLAIN, WHOLE, SPLIT = "plain", "whole", "split"


def _rebuilt_records(traced: dict, logs: Any, once_values: list) -> tuple[dict, dict]:
    """The `recorded` and `once` of a compiled part (`_compiled`) for its
    outputs: what was recorded while it was traced names tensors of its
    own graph, which the step around it cannot use."""
    recorded = {}
    for leaf, entry in zip(tree.flatten(logs), traced["results"], strict=True):
        if entry is not None:
            recorded[id(leaf)] = (leaf, *entry)
    once, values = {}, list(once_values)
    for key, metric, number in traced["once"]:
        once[key] = [metric, *values[:number]]
        values = values[number:]
    return recorded, once


def _compiled(model: Any, step_function: Any, data: Any, count: Any, split: bool) -> tuple:
    """Runs `step_function(data)` as one XLA-compiled function inside the
    (plain) traced step, and returns `(logs, recorded, once, updates)`:
    the step's logs and what `_global_logs` needs of them, and, when
    `split`, the optimizer updates the step asked for, not yet run
    ((optimizer, gradients, variables) each): their exchange is a host op,
    which XLA cannot compile, so it runs after, outside."""
    traced: dict[str, Any] = {}

    def part(data, count):
        deferred: list = [] if split else None
        with (
            step_state.within(samples=count, deferred=deferred),
            _recording_results(model.metrics) as recorded,
            _recording_once_per_step(model.metrics, count) as once,
        ):
            logs = step_function(data)
        traced["results"] = [_recorded_as(leaf, recorded) for leaf in tree.flatten(logs)]
        traced["once"] = [(key, entry[0], len(entry) - 1) for key, entry in once.items()]
        traced["updates"] = [(optimizer, variables) for optimizer, _, variables in deferred or []]
        once_values = [value for entry in once.values() for value in entry[1:]]
        return logs, once_values, [grads for _, grads, _ in deferred or []]

    # autograph off, as Keras traces its steps (`do_not_convert`).
    logs, once_values, grads = tf.function(part, jit_compile=True, autograph=False)(data, count)
    recorded, once = _rebuilt_records(traced, logs, once_values)
    updates = [
        (optimizer, list(g), variables)
        for (optimizer, variables), g in zip(traced["updates"], grads, strict=True)
    ]
    return logs, recorded, once, updates


def wrap_step(model: Any, step_function: Any, backend: Backend, xla: str = PLAIN) -> Any:
    """`step_function` (a train or test step) as it runs on one rank: it
    declares the rank's sample count (`backend.sample_count`) to the
    gradient exchange, draws its own random numbers, and returns global
    logs. With `xla` WHOLE or SPLIT its computation is compiled by XLA
    (`_compiled`) and the exchanges run around it: the step function
    itself must then be traced plain (`jit_compile=False`)."""

    def step(data):
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        first = next(leaf for leaf in tree.flatten(x) if leaf is not None)
        count = backend.sample_count(first)
        with exchange.step(count), step_state.within(in_step=True):
            if xla == PLAIN:
                with (
                    _recording_results(model.metrics) as recorded,
                    _recording_once_per_step(model.metrics, count) as once,
                ):
                    logs = step_function(data)
            else:
                logs, recorded, once, updates = _compiled(
                    model, step_function, data, count, xla == SPLIT
                )
                with step_state.within(compiled_update=True):
                    for optimizer, grads, variables in updates:
                        optimizer.apply(grads, variables)
        return _global_logs(logs, recorded, count, backend, once)

    return step

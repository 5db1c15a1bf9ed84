"""What every Keras 3 train / test step does under N ranks, whoever wrote
the step: Keras's own `train_step` or a script's override.

```python
import keras
from transparent_dist.adapters import keras_steps
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
model.compile("sgd", "mse", metrics=["mae"])
logs = keras_steps.global_metric_results(model.metrics)   # {'loss': ..., 'mae': ...}
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
- Random draws from a `SeedGenerator` (dropout, a GAN's latent noise,
  `keras.random.*` without a seed) differ between ranks inside a step: one
  process with the global batch draws independent noise for every sample,
  and N ranks drawing the same noise would train a GAN on N copies of the
  same fakes. Draws with an integer seed (initializers, explicit stateless
  draws) stay as they are.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import keras
import tensorflow as tf
from keras import tree

from transparent_dist.adapters import common
from transparent_dist.tf import broadcast, exchange

__all__ = ["global_metric_results", "wrap_step"]

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


def global_metric_results(metrics: list[Any]) -> dict[str, Any]:
    """The results of `metrics` over the ranks' summed states, keyed as
    Keras's `get_metrics_result` keys them."""
    metrics = broadcast.unique(list(metrics))
    variables = common.metric_variables(metrics)
    summed = exchange.sum_over_ranks([tf.convert_to_tensor(v) for v in variables])
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
def _recording_results(metrics: list[Any]) -> Iterator[dict[int, tuple[Any, Any, int]]]:
    """While a step is traced, remembers which tensors are which metric's
    `result()`: id(tensor) -> (tensor, metric, index among its leaves).
    The wrapper sits on each metric instance, so a script's own Metric
    subclasses are seen too."""
    recorded: dict[int, tuple[Any, Any, int]] = {}
    wrapped = []
    for metric in broadcast.unique(list(metrics)):
        if "result" in vars(metric):
            continue
        original = metric.result

        def result(original=original, metric=metric):
            out = tree.map_structure(_as_tensor, original())
            for index, leaf in enumerate(tree.flatten(out)):
                recorded[id(leaf)] = (leaf, metric, index)
            return out

        object.__setattr__(metric, "result", result)
        wrapped.append(metric)
    try:
        yield recorded
    finally:
        for metric in wrapped:
            vars(metric).pop("result", None)


def _recorded_as(leaf: Any, recorded: dict) -> tuple[Any, int] | None:
    """(metric, index among its result's leaves) if `leaf` is a recorded
    metric result, else None."""
    entry = recorded.get(id(leaf))
    return entry[1:] if entry is not None and entry[0] is leaf else None


def _global_logs(logs: Any, recorded: dict, count: Any) -> Any:
    """`logs` with metric results replaced by global results and other
    floating-point values by their sample-weighted mean over ranks, in one
    fused exchange."""
    leaves = tree.flatten(logs)
    metrics, others = [], []
    for index, leaf in enumerate(leaves):
        if _recorded_as(leaf, recorded):
            metrics.append(_recorded_as(leaf, recorded)[0])
        elif tf.is_tensor(leaf) and leaf.dtype.is_floating:
            others.append(index)
    metrics = broadcast.unique(metrics)
    variables = common.metric_variables(metrics)
    weight = tf.cast(count, tf.float32)
    payload = [tf.convert_to_tensor(v) for v in variables]
    payload += [tf.cast(leaves[i], tf.float32) * weight for i in others]
    summed = exchange.sum_over_ranks([*payload, tf.reshape(weight, [1])])
    total = summed[-1][0]
    by_id = {id(v): s for v, s in zip(variables, summed[: len(variables)], strict=True)}
    results = {
        id(metric): tree.flatten(_result_from(metric, [by_id[id(v)] for v in metric.variables]))
        for metric in metrics
    }
    out = list(leaves)
    for index, leaf in enumerate(leaves):
        if _recorded_as(leaf, recorded):
            metric, position = _recorded_as(leaf, recorded)
            out[index] = results[id(metric)][position]
    for index, value in zip(others, summed[len(variables) : -1], strict=True):
        out[index] = tf.cast(value / total, leaves[index].dtype)
    return tree.pack_sequence_as(logs, out)


# ------------------------------------------------------------ the step


def wrap_step(model: Any, step_function: Any) -> Any:
    """`step_function` (a train or test step) as it runs on one rank: it
    declares the rank's sample count to the gradient exchange, draws its
    own random numbers, and returns global logs."""

    def step(data):
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        first = next(leaf for leaf in tree.flatten(x) if leaf is not None)
        count = tf.shape(first)[0]
        with (
            exchange.step(count),
            common.flag("in_step"),
            _recording_results(model.metrics) as recorded,
        ):
            logs = step_function(data)
        return _global_logs(logs, recorded, count)

    return step

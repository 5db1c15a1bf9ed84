"""tf_keras (Keras 2, `TF_USE_LEGACY_KERAS=1`) made data-parallel, installed
by `install()` when the script imports `tf_keras` (or `tf.keras` maps to it).

```python
import tf_keras
from transparent_dist.patches import tf_keras as patch
patch.install()      # idempotent; transparent_dist's import hook calls it
```

The same treatment as Keras 3 (see `patches/keras3.py`): every optimizer's
`apply_gradients` (new and legacy optimizers) broadcasts rank 0's weights
before the first update and averages the gradients, weighted by each rank's
samples in the step; `get_metrics_result` reports global metrics; `fit`,
`evaluate` and `predict` shard in-memory arrays (global batch k is plain
tf_keras's k-th batch of size N*b), `tf.data` datasets and generators by
`tf_inputs`, keep file-writing callbacks and progress bars on rank 0, and
`predict` returns all rows on every rank; `save` / `save_weights` write on
rank 0 only. `keras.utils.Sequence` inputs are not sharded (each rank uses
all of it).
"""

from __future__ import annotations

import inspect
from typing import Any

import tensorflow as tf
import tf_keras
from tf_keras.src.engine import data_adapter
from tf_keras.src.engine import training as training_module
from tf_keras.src.optimizers import optimizer as new_optimizer
from tf_keras.src.optimizers.legacy import optimizer_v2

from transparent_dist import (
    broadcast,
    collectives,
    gradients,
    log,
    output,
    patching,
    tf_inputs,
    world,
)
from transparent_dist.patches import common

Model = training_module.Model


_distributed = common.distributed


# ------------------------------------------------------------ optimizers


def _wrap_apply_gradients(original: Any) -> Any:
    def apply_gradients(self, grads_and_vars, *args, **kwargs):
        if not _distributed() or common.is_set("applying"):
            return original(self, grads_and_vars, *args, **kwargs)
        pairs = list(grads_and_vars)
        variables = [v for _, v in pairs]
        if not broadcast.is_synced(self):
            with tf.init_scope():
                broadcast.variables(variables, what="trainable variables")
            broadcast.mark_synced(self)
        averaged = gradients.average([g for g, _ in pairs])
        with common.flag("applying"):
            return original(self, list(zip(averaged, variables, strict=True)), *args, **kwargs)

    return apply_gradients


# ------------------------------------------------------------ steps, loss, metrics


def _with_sample_count(step: Any) -> Any:
    def step_with_sample_count(data):
        x, _, _ = data_adapter.unpack_x_y_sample_weight(data)
        first = tf.nest.flatten(x)[0]
        with gradients.samples_in_step(tf.shape(first)[0]):
            return step(data)

    step_with_sample_count._td_counted = True
    return step_with_sample_count


def _wrap_make_function(original: Any, step_name: str) -> Any:
    def make_function(self, force=False):
        step = getattr(self, step_name)
        if _distributed() and not getattr(step, "_td_counted", False):
            # The step function looks `train_step` up on the model when it is
            # traced: an instance attribute wraps it, overrides included.
            object.__setattr__(self, step_name, _with_sample_count(step))
        return original(self, force)

    return make_function


def _wrap_get_metrics_result(original: Any) -> Any:
    def get_metrics_result(self):
        if not _distributed():
            return original(self)
        variables = common.metric_variables(self.metrics)
        if not variables:
            return original(self)
        # tf_keras metrics have no stateless result: read the local state,
        # put the global sums in place, compute, and put the local state
        # back (stateful ops keep this order inside a tf.function).
        local = [tf.identity(v.read_value()) for v in variables]
        summed = gradients.sum_over_ranks(local)
        with tf.control_dependencies([v.assign(s) for v, s in zip(variables, summed, strict=True)]):
            results = tf.nest.map_structure(tf.identity, original(self))
        with tf.control_dependencies(tf.nest.flatten(results)):
            restored = [v.assign(x) for v, x in zip(variables, local, strict=True)]
        with tf.control_dependencies(restored):
            return tf.nest.map_structure(tf.identity, results)

    return get_metrics_result


# ------------------------------------------------------------ fit / evaluate / predict


class _Sync(tf_keras.callbacks.Callback):
    """Rank 0's variables everywhere when fit / evaluate / predict begins;
    rank 0's non-trainable ones at each epoch's end."""

    def _build(self, optimizer: Any, variables: list[Any]) -> None:
        if isinstance(optimizer, new_optimizer._BaseOptimizer):
            if not getattr(optimizer, "_built", False):
                optimizer.build(variables)
        else:
            optimizer._create_all_weights(variables)

    def on_train_begin(self, logs=None):
        broadcast.model_and_optimizer(self.model, self._build)

    def on_test_begin(self, logs=None):
        if not common.is_set("fitting"):
            broadcast.model_and_optimizer(self.model)

    def on_predict_begin(self, logs=None):
        broadcast.model_and_optimizer(self.model)

    def on_epoch_end(self, epoch, logs=None):
        broadcast.variables(self.model.non_trainable_variables, what="non-trainable variables")


_ROOT_ONLY = (
    tf_keras.callbacks.ModelCheckpoint,
    tf_keras.callbacks.CSVLogger,
    tf_keras.callbacks.TensorBoard,
    tf_keras.callbacks.RemoteMonitor,
    tf_keras.callbacks.ProgbarLogger,
)


_AgreeToStop = common.stop_agreement(tf_keras.callbacks.Callback)


def _callbacks(callbacks: Any, fitting: bool = False) -> list[Any]:
    is_root = world.get().is_root
    kept = [cb for cb in callbacks or [] if is_root or not isinstance(cb, _ROOT_ONLY)]
    return [_Sync(), *kept, *([_AgreeToStop()] if fitting else [])]


def _is_arrays(x: Any) -> bool:
    leaves = tf.nest.flatten(x)
    return (
        bool(leaves)
        and all(hasattr(a, "shape") and hasattr(a, "__getitem__") for a in leaves)
        and not isinstance(x, tf.data.Dataset)
    )


def _shard(x: Any, y: Any, sample_weight: Any, batch_size: Any, shuffle: Any, what: str):
    w = world.get()
    if isinstance(x, tf.data.Dataset):
        return tf_inputs.dataset_batches(x, w.rank, w.size), None, None, None
    if inspect.isgenerator(x):
        return tf_inputs.generator_batches(x, w.rank, w.size), None, None, None
    if not _is_arrays(x):
        log.info(f"{what} of type {type(x).__name__} is not sharded: every rank uses all of it")
        return x, y, sample_weight, batch_size
    inputs = data_adapter.pack_x_y_sample_weight(x, y, sample_weight)
    n = int(tf.nest.flatten(inputs)[0].shape[0])
    return (
        tf_inputs.shard_arrays(inputs, n, batch_size, shuffle, what, _index_batches),
        None,
        None,
        None,
    )


def _index_batches(n: int, global_batch: int, shuffle: Any) -> tf.data.Dataset:
    """Global batches of indices in tf_keras's own order (its adapter)."""
    return data_adapter.TensorLikeDataAdapter(
        tf.range(n, dtype=tf.int64), batch_size=global_batch, shuffle=bool(shuffle)
    ).get_dataset()


def _disable_xla(model: Any) -> None:
    if getattr(model, "_jit_compile", False):
        model._jit_compile = False
        model.train_function = model.test_function = model.predict_function = None
        log.info("jit_compile (XLA) is turned off: MPI runs inside the step")


def _wrap_fit(original: Any) -> Any:
    def fit(self, *args, **kwargs):
        if not _distributed() or common.is_set("fitting"):
            return original(self, *args, **kwargs)
        a = common.bind(original, self, args, kwargs)
        common.enter_phase("fit", a)
        _disable_xla(self)
        x, y, sw, batch_size = a["x"], a["y"], a["sample_weight"], a["batch_size"]
        if a["validation_split"] and a["validation_data"] is None and _is_arrays(x):
            (x, y, sw), a["validation_data"] = data_adapter.train_validation_split(
                (x, y, sw), validation_split=a["validation_split"]
            )
            a["validation_split"] = 0.0
        a["x"], a["y"], a["sample_weight"], a["batch_size"] = _shard(
            x, y, sw, batch_size, a["shuffle"], "the training data"
        )
        if a["validation_data"] is not None:
            vd = a["validation_data"]
            vx, vy, vw = (
                data_adapter.unpack_x_y_sample_weight(tuple(vd))
                if isinstance(vd, (tuple, list))
                else (vd, None, None)
            )
            vbatch = a["validation_batch_size"] or batch_size
            vx, vy, vw, vbatch = _shard(vx, vy, vw, vbatch, False, "the validation data")
            a["validation_data"] = vx if vy is None and vw is None else (vx, vy, vw)
            a["validation_batch_size"] = vbatch
        common.output_on_root_only(a, _callbacks(a["callbacks"], fitting=True))
        with common.flag("fitting"):
            return common.call(original, a)

    return fit


def _wrap_evaluate(original: Any) -> Any:
    def evaluate(self, *args, **kwargs):
        if not _distributed() or common.is_set("fitting"):
            return original(self, *args, **kwargs)
        a = common.bind(original, self, args, kwargs)
        common.enter_phase("evaluate", a)
        _disable_xla(self)
        a["x"], a["y"], a["sample_weight"], a["batch_size"] = _shard(
            a["x"], a["y"], a["sample_weight"], a["batch_size"], False, "the evaluation data"
        )
        common.output_on_root_only(a, _callbacks(a["callbacks"]))
        return common.call(original, a)

    return evaluate


def _wrap_predict(original: Any) -> Any:
    def predict(self, *args, **kwargs):
        if not _distributed():
            return original(self, *args, **kwargs)
        w = world.get()
        a = common.bind(original, self, args, kwargs)
        common.enter_phase("predict", a)
        _disable_xla(self)
        gather = _is_arrays(a["x"])
        if gather:
            n = int(tf.nest.flatten(a["x"])[0].shape[0])
            tf_inputs.agree_on_samples(n, "the data to predict")
            a["x"] = tf_inputs.array_block(a["x"], n, w.rank, w.size)
        common.output_on_root_only(a, _callbacks(a["callbacks"]))
        outputs = common.call(original, a)
        if not gather:
            return outputs
        return tf.nest.map_structure(lambda o: collectives.allgather_rows(o, w.comm), outputs)

    return predict


def install() -> None:
    """Installs the tf_keras patches (idempotent)."""
    for cls in common.classes_defining(
        [new_optimizer._BaseOptimizer, optimizer_v2.OptimizerV2], "apply_gradients"
    ):
        patching.wrap(cls, "apply_gradients", _wrap_apply_gradients)
    patching.wrap(Model, "make_train_function", lambda o: _wrap_make_function(o, "train_step"))
    patching.wrap(Model, "make_test_function", lambda o: _wrap_make_function(o, "test_step"))
    patching.wrap(Model, "compute_loss", common.wrap_compute_loss)
    patching.wrap(Model, "get_metrics_result", _wrap_get_metrics_result)
    patching.wrap(Model, "fit", _wrap_fit)
    patching.wrap(Model, "evaluate", _wrap_evaluate)
    patching.wrap(Model, "predict", _wrap_predict)
    patching.wrap(Model, "save", output.root_only)
    patching.wrap(Model, "save_weights", output.root_only)
    from tf_keras.src.saving import saving_api

    patching.wrap_everywhere(saving_api.save_model, output.root_only, "tf_keras")

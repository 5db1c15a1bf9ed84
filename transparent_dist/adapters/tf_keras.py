"""tf_keras (Keras 2, `TF_USE_LEGACY_KERAS=1`) as the one Keras adapter
sees it, and the patches only tf_keras needs. Every `tf_keras.src` import
of the package is here.

```python
import tf_keras
from transparent_dist.adapters import tf_keras as adapter
adapter.install()      # idempotent; transparent_dist's import hook calls it
```

The same treatment as Keras 3, from the same code (`adapters.keras`):
file inputs, `TD_LR_SCALING`, the fit summary, checkpoint-and-resume and
preemption included. Differences are tf_keras's own: every optimizer's
`apply_gradients` (new and legacy optimizers) is patched instead of
`apply`; the train / test step is reached through `make_train_function`;
metrics have no stateless result, so `get_metrics_result` swaps the global
sums in and the local state back; `keras.utils.Sequence` inputs are not
sharded (each rank uses all of it).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import tensorflow as tf
import tf_keras
from tf_keras.src.engine import data_adapter
from tf_keras.src.engine import training as training_module
from tf_keras.src.optimizers import optimizer as new_optimizer
from tf_keras.src.optimizers.legacy import optimizer_v2
from tf_keras.src.saving import saving_api

from transparent_dist.adapters import keras as adapter
from transparent_dist.adapters import root_output
from transparent_dist.core import patching, step_state, world
from transparent_dist.tf import broadcast, exchange
from transparent_dist.tf import inputs as tf_inputs
from transparent_dist.tf.backend import TENSORFLOW
from transparent_dist.tf.inputs import resume

__all__ = ["FRAMEWORK", "install"]

Model = training_module.Model


# ------------------------------------------------------------ the description


def _pack(x: Any, y: Any = None, sample_weight: Any = None) -> tuple[Any, int]:
    inputs = data_adapter.pack_x_y_sample_weight(x, y, sample_weight)
    return inputs, int(tf.nest.flatten(inputs)[0].shape[0])


def _index_batches(n: int, global_batch: int, shuffle: Any) -> tf.data.Dataset:
    """Global batches of indices in tf_keras's own order (its adapter)."""
    return data_adapter.TensorLikeDataAdapter(
        tf.range(n, dtype=tf.int64), batch_size=global_batch, shuffle=bool(shuffle)
    ).get_dataset()


def _turn_off_xla(model: Any, training: bool) -> bool:
    if not getattr(model, "_jit_compile", False):
        return False
    model._jit_compile = False
    return True


def _build_optimizer(optimizer: Any, variables: list) -> None:
    if isinstance(optimizer, new_optimizer._BaseOptimizer):
        if not getattr(optimizer, "_built", False):
            optimizer.build(variables)
    else:
        optimizer._create_all_weights(variables)


def _learning_rate(optimizer: Any) -> Any:
    if isinstance(optimizer, new_optimizer._BaseOptimizer):
        rate = getattr(optimizer, "_learning_rate", None)
    else:
        rate = optimizer._get_hyper("learning_rate")
    return rate if isinstance(rate, tf.Variable) else None


def _silence_backup(callback: Any) -> None:
    # It restores in on_train_begin; it writes and deletes in these.
    callback.on_epoch_end = callback.on_train_end = callback.on_train_batch_end = root_output.no_op


@contextlib.contextmanager
def _exact_epochs_after_resume() -> Iterator[None]:
    """The resumed epoch of a resumed dataset (`tf.inputs.resume.skip_first`) runs
    its remaining steps, the epochs after it their full length: tf_keras's
    DataHandler starts the first epoch at the step already done (its own
    mid-epoch resume, `_initial_step`, which `fit` resets after building
    the handler: so it is set when the first epoch's steps begin)."""
    handler = data_adapter.DataHandler
    configure, steps = handler._configure_dataset_and_inferred_steps, handler.steps
    # Handler -> the step its first epoch starts at, until that epoch starts.
    first_steps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def configure_lengths(self, *args, **kwargs):
        configure(self, *args, **kwargs)
        dataset = getattr(self._adapter, "_dataset", None)
        lengths = resume.epoch_lengths(dataset)
        if lengths is not None:
            self._inferred_steps = lengths[1]
            first_steps[self] = lengths[1] - lengths[0]
            if not resume.endless(dataset):
                # A pass per epoch, as the uninterrupted run made (its data's
                # length, known there, was `steps_per_epoch` or none given).
                self._adapter.should_recreate_iterator = lambda: True

    def steps_from_resumed(self):
        first = first_steps.pop(self, 0)
        if first:
            self._initial_step = first
        yield from steps(self)

    handler._configure_dataset_and_inferred_steps = configure_lengths
    handler.steps = steps_from_resumed
    try:
        yield
    finally:
        handler._configure_dataset_and_inferred_steps, handler.steps = configure, steps


@contextlib.contextmanager
def _after_loss(model: Any) -> Iterator[None]:
    """tf_keras's `fit` evaluates through the data handler an earlier run
    cached (`_eval_data_handler`, dropped only at a fit's end: the ended
    run's is split for the old world), and takes its first epoch and step
    from a `BackupAndRestore` that began (`model._training_state`, left set
    by the ended run): after a loss, a new handler, and the survivors'
    epoch and step."""
    if getattr(model, "_eval_data_handler", None) is not None:
        del model._eval_data_handler
    load = Model._maybe_load_initial_counters_from_ckpt
    Model._maybe_load_initial_counters_from_ckpt = lambda self, steps, initial_epoch: (
        initial_epoch,
        0,
    )
    try:
        yield
    finally:
        Model._maybe_load_initial_counters_from_ckpt = load


FRAMEWORK = adapter.Framework(
    name="tf_keras",
    backend=TENSORFLOW,
    **adapter.callbacks_of(tf_keras.callbacks),
    arrays=tf_inputs.ArrayFormat(
        is_arrays=tf_inputs.PLAIN_ARRAYS.is_arrays, pack=_pack, index_batches=_index_batches
    ),
    split_validation=lambda xyw, split: data_adapter.train_validation_split(
        xyw, validation_split=split
    ),
    unpack=data_adapter.unpack_x_y_sample_weight,
    turn_off_xla=_turn_off_xla,
    build_optimizer=_build_optimizer,
    learning_rate=_learning_rate,
    own_train_step=lambda model: False,
    silence_backup=_silence_backup,
    exact_epochs_after_resume=_exact_epochs_after_resume,
    after_loss=_after_loss,
)


# ------------------------------------------------------------ optimizers


def _wrap_apply_gradients(original: Any) -> Any:
    def apply_gradients(self, grads_and_vars, *args, **kwargs):
        if not world.get().distributed or step_state.current().applying:
            return original(self, grads_and_vars, *args, **kwargs)
        pairs = list(grads_and_vars)
        variables = [v for _, v in pairs]
        return adapter.update(
            FRAMEWORK.backend,
            self,
            [g for g, _ in pairs],
            variables,
            lambda averaged: original(
                self, list(zip(averaged, variables, strict=True)), *args, **kwargs
            ),
        )

    return apply_gradients


# ------------------------------------------------------------ steps, metrics


# The step functions `_with_sample_count` made (a model's step is wrapped once).
_COUNTED: weakref.WeakSet = weakref.WeakSet()


def _with_sample_count(step: Any) -> Any:
    def step_with_sample_count(data):
        x, _, _ = data_adapter.unpack_x_y_sample_weight(data)
        first = tf.nest.flatten(x)[0]
        with exchange.step(tf.shape(first)[0]):
            return step(data)

    _COUNTED.add(step_with_sample_count)
    return step_with_sample_count


def _wrap_make_function(original: Any, step_name: str) -> Any:
    def make_function(self, force=False):
        step = getattr(self, step_name)
        if world.get().distributed and step not in _COUNTED:
            # The step function looks `train_step` up on the model when it is
            # traced: an instance attribute wraps it, overrides included.
            object.__setattr__(self, step_name, _with_sample_count(step))
        return original(self, force)

    return make_function


def _wrap_get_metrics_result(original: Any) -> Any:
    def get_metrics_result(self):
        if not world.get().distributed:
            return original(self)
        variables = broadcast.metric_variables(self.metrics)
        if not variables:
            return original(self)
        # tf_keras metrics have no stateless result: read the local state,
        # put the global sums in place, compute, and put the local state
        # back (stateful ops keep this order inside a tf.function).
        local = [tf.identity(v.read_value()) for v in variables]
        summed = exchange.sum_over_ranks(local)
        with tf.control_dependencies([v.assign(s) for v, s in zip(variables, summed, strict=True)]):
            results = tf.nest.map_structure(tf.identity, original(self))
        with tf.control_dependencies(tf.nest.flatten(results)):
            restored = [v.assign(x) for v, x in zip(variables, local, strict=True)]
        with tf.control_dependencies(restored):
            return tf.nest.map_structure(tf.identity, results)

    return get_metrics_result


def install() -> None:
    """Installs the tf_keras patches (idempotent)."""
    for cls in patching.classes_defining(
        [new_optimizer._BaseOptimizer, optimizer_v2.OptimizerV2], "apply_gradients"
    ):
        patching.wrap(cls, "apply_gradients", _wrap_apply_gradients)
    patching.wrap(Model, "make_train_function", lambda o: _wrap_make_function(o, "train_step"))
    patching.wrap(Model, "make_test_function", lambda o: _wrap_make_function(o, "test_step"))
    patching.wrap(Model, "compute_loss", adapter.wrap_compute_loss(FRAMEWORK.backend))
    patching.wrap(Model, "get_metrics_result", _wrap_get_metrics_result)
    adapter.install_calls(FRAMEWORK, Model, Model, saving_api.save_model, "tf_keras")

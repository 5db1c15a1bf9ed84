"""Keras 3 as the one Keras adapter sees it, and the patches only Keras 3
needs, whatever its backend: the backend is reached through the `Backend`
of the `Framework` (`core.backend`); what must name the backend's own
classes (its trainer, its epoch iterator, its random module, `tf.data`)
is in that backend's file (`keras3_tensorflow`), which builds the
`Framework` with `framework` and installs these patches with `install`.

```python
import keras
from transparent_dist.adapters import keras3_tensorflow
keras3_tensorflow.install()   # idempotent; the import hook calls it (KERAS_BACKEND=tensorflow)
```

Patched here (the shared logic is `adapters.keras`):

- every optimizer's `apply` (so `fit`, `train_on_batch` and custom
  `GradientTape` loops that call `apply_gradients` / `apply` alike):
  `keras.update`; `scale_loss` divides the loss by N in Keras's own train
  step (`Backend.divide_loss`);
- `_compute_loss` makes the loss of an empty local batch 0;
- `get_metrics_result`: metric states summed over the ranks;
- `fit`, `evaluate`, `predict` of the backend's trainer: `keras.wrap_fit` ...;
- `Model.save`, `Model.save_weights`, `keras.saving.save_model`: rank 0 only.

The backend's file patches the rest: its trainer's `_make_function` (each
train / test step declares its sample count and returns global logs,
`keras_steps`) and its `SeedGenerator` draws inside a step (one stream per
rank).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras as keras_module
from keras.src import backend as keras_backend
from keras.src.backend.common.stateless_scope import in_stateless_scope
from keras.src.models.model import Model
from keras.src.optimizers.base_optimizer import BaseOptimizer
from keras.src.optimizers.loss_scale_optimizer import LossScaleOptimizer
from keras.src.saving import saving_api
from keras.src.trainers.data_adapters import array_slicing, data_adapter_utils
from keras.src.trainers.data_adapters.array_data_adapter import can_convert_arrays
from keras.src.trainers.trainer import Trainer

from transparent_dist.adapters import keras as adapter
from transparent_dist.adapters import keras_pydataset, keras_steps, root_output
from transparent_dist.core import patching, step_state, world
from transparent_dist.core.backend import Backend
from transparent_dist.tf import inputs as tf_inputs

__all__ = ["framework", "install"]


# ------------------------------------------------------------ the description


def _pack(x: Any, y: Any = None, sample_weight: Any = None) -> tuple[Any, int]:
    """`(inputs, num_samples)` of array data, checked like Keras checks it."""
    inputs = keras_module.tree.lists_to_tuples(
        data_adapter_utils.pack_x_y_sample_weight(x, y, sample_weight)
    )
    data_adapter_utils.check_data_cardinality(inputs)
    leaves = [a for a in keras_module.tree.flatten(inputs) if a is not None]
    return inputs, int(leaves[0].shape[0])


def _turn_off_xla(own_train_step: Callable[[Any], bool]) -> Callable[[Any, bool], bool]:
    """`turn_off_xla` for Keras 3: only a script's own train step loses
    XLA, in `fit` (its update, and so the exchange, is somewhere inside
    it); Keras's own train step and every test and predict step keep it
    (`keras_steps.wrap_step`)."""

    def turn_off(model: Any, training: bool) -> bool:
        if not (training and model.jit_compile) or own_train_step(model):
            return False
        model.jit_compile = False
        return True

    return turn_off


def _build_optimizer(optimizer: Any, variables: list) -> None:
    # Built now rather than inside the first traced step, so that its state
    # is broadcast (or restored) like the weights.
    if not optimizer.built:
        optimizer.build(variables)


def _learning_rate(optimizer: Any) -> Any:
    rate = getattr(optimizer, "_learning_rate", None)
    return rate if isinstance(rate, keras_module.Variable) else None


def _silence_backup(callback: Any) -> None:
    callback._save_model = root_output.no_op
    callback.on_train_end = root_output.no_op


def framework(
    backend: Backend,
    *,
    index_batches: Callable[[int, int, Any], Any],
    generator_spec: Callable[[list[Any]], tuple[Any, Any] | None],
    own_train_step: Callable[[Any], bool],
    build_before_training: Callable[[Any, Any], None],
    exact_epochs_after_resume: Callable[[], Any],
) -> adapter.Framework:
    """Keras 3 over `backend` as a `Framework`; the arguments are what only
    the backend's file knows (its batch order, its generators' element
    spec, its trainer's train step, its lazy build and its epoch loop;
    `adapter.Framework` says what each is)."""
    return adapter.Framework(
        name="keras",
        backend=backend,
        **adapter.callbacks_of(keras_module.callbacks),
        arrays=tf_inputs.ArrayFormat(
            is_arrays=can_convert_arrays,
            pack=_pack,
            index_batches=index_batches,
            sequence_class=keras_module.utils.PyDataset,
            sequence_part=keras_pydataset.part,
            generator_spec=generator_spec,
        ),
        split_validation=lambda xyw, split: array_slicing.train_validation_split(
            xyw, validation_split=split
        ),
        unpack=data_adapter_utils.unpack_x_y_sample_weight,
        turn_off_xla=_turn_off_xla(own_train_step),
        build_optimizer=_build_optimizer,
        learning_rate=_learning_rate,
        own_train_step=own_train_step,
        silence_backup=_silence_backup,
        build_before_training=build_before_training,
        exact_epochs_after_resume=exact_epochs_after_resume,
        root_counts=keras_steps.counted_on_root_only,
    )


# ------------------------------------------------------------ optimizers


def _wrap_apply(backend: Backend) -> Callable[[Any], Any]:
    def wrap(original: Any) -> Any:
        def apply(self, grads, trainable_variables=None):
            state = step_state.current()
            if state.deferred is not None and not state.applying:
                # The XLA-compiled part of a split step (`keras_steps`):
                # its gradients leave it; the step updates after it,
                # exchange first.
                state.deferred.append((self, list(grads), trainable_variables))
                return None
            if not world.get().distributed or state.applying:
                return original(self, grads, trainable_variables)
            grads = list(grads)
            if not grads:
                return original(self, grads, trainable_variables)
            variables = (
                list(trainable_variables)
                if trainable_variables is not None
                else list(self._trainable_variables)
            )
            if not self.built:
                # As Keras's own apply would, but outside the trace, so its
                # state holds values that can be broadcast before the first step.
                with backend.outside_trace(), keras_backend.name_scope(self.name, caller=self):
                    self.build(variables)
                self.built = True
            return adapter.update(
                backend,
                self,
                grads,
                variables,
                lambda averaged: original(self, averaged, trainable_variables),
            )

        return apply

    return wrap


def _wrap_scale_loss(backend: Backend) -> Callable[[Any], Any]:
    def wrap(original: Any) -> Any:
        def scale_loss(self, loss):
            loss = original(self, loss)
            # Only in Keras's own train step, which takes the gradients of this
            # loss straight to `apply`; once, however subclasses chain it. Not
            # under dynamic loss scaling (mixed float16): dividing by N there
            # would push small float16 gradients N times closer to underflow,
            # which is what the loss scale exists to prevent.
            state = step_state.current()
            if (
                not (state.fitting and state.own_train_step)
                or state.scaling
                or isinstance(self, LossScaleOptimizer)
            ):
                return loss
            with step_state.within(scaling=True):
                return backend.divide_loss(loss)

        return scale_loss

    return wrap


# ------------------------------------------------------------ metrics


def _wrap_get_metrics_result(backend: Backend) -> Callable[[Any], Any]:
    def wrap(original: Any) -> Any:
        def get_metrics_result(self):
            # Inside a step the logs are made global by the step wrapper, in
            # one exchange with the step's other log values.
            if not world.get().distributed or in_stateless_scope() or step_state.current().in_step:
                return original(self)
            return keras_steps.global_metric_results(self.metrics, backend)

        return get_metrics_result

    return wrap


# ------------------------------------------------------------ install


def install(fw: adapter.Framework, trainer: type) -> None:
    """Installs the backend-neutral Keras 3 patches for `fw` (its
    `Backend`) and the backend's `trainer` class (idempotent)."""
    for cls in patching.classes_defining([BaseOptimizer], "apply"):
        patching.wrap(cls, "apply", _wrap_apply(fw.backend))
    for cls in patching.classes_defining([BaseOptimizer], "scale_loss"):
        patching.wrap(cls, "scale_loss", _wrap_scale_loss(fw.backend))
    patching.wrap(Trainer, "_compute_loss", adapter.wrap_compute_loss(fw.backend))
    patching.wrap(Trainer, "get_metrics_result", _wrap_get_metrics_result(fw.backend))
    # save_model: every public alias (keras.saving, keras.models, tf.keras).
    adapter.install_calls(fw, trainer, Model, saving_api.save_model, "keras")

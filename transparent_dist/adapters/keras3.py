"""Keras 3 (TensorFlow backend) as the one Keras adapter sees it, and the
patches only Keras 3 needs. Every `keras.src` import of the package is here.

```python
import keras
from transparent_dist.adapters import keras3
keras3.install()      # idempotent; transparent_dist's import hook calls it
```

Patched (the shared logic is `adapters.keras`):

- every optimizer's `apply` (so `fit`, `train_on_batch` and custom
  `GradientTape` loops that call `apply_gradients` / `apply` alike):
  `keras.update`; `scale_loss` divides the loss by N in Keras's own train
  step (`exchange.divide_loss`);
- the trainer's `_make_function`: each train / test step declares its
  sample count and returns global logs (`keras_steps`); `_compute_loss`
  makes the loss of an empty local batch 0;
- `get_metrics_result`: metric states summed over the ranks;
- `fit`, `evaluate`, `predict`: `keras.wrap_fit` ...;
- `SeedGenerator` draws inside a step: one stream per rank;
- `Model.save`, `Model.save_weights`, `keras.saving.save_model`: rank 0 only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import keras as keras_module
import numpy as np
import tensorflow as tf
from keras.src import backend as keras_backend
from keras.src import tree
from keras.src.backend.common.stateless_scope import in_stateless_scope
from keras.src.backend.tensorflow import image as tf_image
from keras.src.backend.tensorflow import random as tf_random
from keras.src.backend.tensorflow import trainer as tf_trainer
from keras.src.backend.tensorflow.trainer import TensorFlowTrainer
from keras.src.models.model import Model
from keras.src.optimizers.base_optimizer import BaseOptimizer
from keras.src.optimizers.loss_scale_optimizer import LossScaleOptimizer
from keras.src.random.seed_generator import SeedGenerator
from keras.src.saving import saving_api
from keras.src.trainers.data_adapters import array_slicing, data_adapter_utils
from keras.src.trainers.data_adapters.array_data_adapter import (
    ArrayDataAdapter,
    can_convert_arrays,
)
from keras.src.trainers.trainer import Trainer

from transparent_dist.adapters import keras as adapter
from transparent_dist.adapters import keras_pydataset, keras_steps, root_output
from transparent_dist.core import log, patching, step_state, world
from transparent_dist.tf import exchange
from transparent_dist.tf import inputs as tf_inputs

__all__ = ["FRAMEWORK", "install"]


def _distributed() -> bool:
    return world.get().distributed


# ------------------------------------------------------------ the description


def _pack(x: Any, y: Any = None, sample_weight: Any = None) -> tuple[Any, int]:
    """`(inputs, num_samples)` of array data, checked like Keras checks it."""
    inputs = keras_module.tree.lists_to_tuples(
        data_adapter_utils.pack_x_y_sample_weight(x, y, sample_weight)
    )
    data_adapter_utils.check_data_cardinality(inputs)
    leaves = [a for a in keras_module.tree.flatten(inputs) if a is not None]
    return inputs, int(leaves[0].shape[0])


def _index_batches(num_samples: int, global_batch: int, shuffle: Any) -> tf.data.Dataset:
    """Global batches of sample indices in the order plain Keras 3 takes
    them: its own adapter over 0..n-1 (so, for a given TF seed, the same
    shuffle permutation as plain `fit`)."""
    return ArrayDataAdapter(
        np.arange(num_samples, dtype=np.int64), batch_size=global_batch, shuffle=shuffle
    ).get_tf_dataset()


def _turn_off_xla(model: Any) -> bool:
    if not model.jit_compile:
        return False
    model.jit_compile = False
    return True


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


def _build_before_training(model: Any, data: Any) -> None:
    """Builds a lazily built model (no `Input`, subclassed) from the shapes
    of its data, as Keras does under a distribution strategy, so that its
    weights exist, and are broadcast, before the first step: otherwise the
    first forward pass would run on each rank's own initial weights. Where
    that cannot be done here, the weights are synced inside the first step
    instead (`broadcast.before_first_update`)."""
    if all(layer.built for layer in model._flatten_layers()):
        return
    if not isinstance(data, tf.data.Dataset):
        return
    try:
        model._symbolic_build(data_batch=data.element_spec)
    except Exception as error:  # noqa: BLE001 - Keras builds it in the first step instead
        log.debug(f"the model could not be built before training ({error}); built in step 1")


@contextlib.contextmanager
def _exact_epochs_after_resume() -> Iterator[None]:
    """Tells Keras the exact length of each epoch of a resumed dataset
    (`adapter._skip_first`): short for the resumed epoch, full after it.
    Left to find the end by running out of data, Keras would make one more
    step call, in which the optimizer's step counter and the dropout seed
    (which need no data) still advance."""
    original = tf_trainer.TFEpochIterator

    class ResumedEpochIterator(original):
        def _lengths(self):
            return adapter.epoch_lengths(getattr(self.data_adapter, "_dataset", None))

        def reset(self):
            super().reset()
            if self._lengths():
                self._num_batches = self._lengths()[0]

        def _enumerate_iterator(self):
            yield from super()._enumerate_iterator()
            if self._lengths():
                self._num_batches = self._lengths()[1]

    tf_trainer.TFEpochIterator = ResumedEpochIterator
    try:
        yield
    finally:
        tf_trainer.TFEpochIterator = original


def _generator_spec(batches: list[Any]) -> tuple[Any, Any] | None:
    """`(element spec, converter of a batch to it)` as Keras's generator
    adapter makes them from a script's first batches (dimensions that
    differ between them, and the batch's, left open; scipy sparse as
    `tf.SparseTensor`, None as an empty optional); None where the batches
    are not what Keras takes (tuples): Keras then says what is wrong."""
    if not batches or not all(isinstance(b, tuple) for b in batches):
        return None
    try:
        # tf.data takes tuples, not lists (a multi-input model's `[x1, x2]`).
        spec = tree.lists_to_tuples(data_adapter_utils.get_tensor_spec(batches))
    except (TypeError, ValueError):
        return None

    def leaf(x: Any) -> Any:
        if x is None:
            return tf.experimental.Optional.empty(None)
        if data_adapter_utils.is_scipy_sparse(x):
            return data_adapter_utils.scipy_sparse_to_tf_sparse(x)
        return x

    return spec, lambda batch: tree.lists_to_tuples(
        tree.map_structure(leaf, batch, none_is_leaf=True)
    )


FRAMEWORK = adapter.Framework(
    name="keras",
    **adapter.callbacks_of(keras_module.callbacks),
    arrays=tf_inputs.ArrayFormat(
        is_arrays=can_convert_arrays,
        pack=_pack,
        index_batches=_index_batches,
        sequence_class=keras_module.utils.PyDataset,
        sequence_part=keras_pydataset.part,
        generator_spec=_generator_spec,
    ),
    split_validation=lambda xyw, split: array_slicing.train_validation_split(
        xyw, validation_split=split
    ),
    unpack=data_adapter_utils.unpack_x_y_sample_weight,
    turn_off_xla=_turn_off_xla,
    build_optimizer=_build_optimizer,
    learning_rate=_learning_rate,
    own_train_step=lambda model: type(model).train_step is TensorFlowTrainer.train_step,
    silence_backup=_silence_backup,
    build_before_training=_build_before_training,
    exact_epochs_after_resume=_exact_epochs_after_resume,
    root_counts=keras_steps.counted_on_root_only,
)


# ------------------------------------------------------------ optimizers


def _wrap_apply(original: Any) -> Any:
    def apply(self, grads, trainable_variables=None):
        if not _distributed() or step_state.current().applying:
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
            with tf.init_scope(), keras_backend.name_scope(self.name, caller=self):
                self.build(variables)
            self.built = True
        return adapter.update(
            self, grads, variables, lambda averaged: original(self, averaged, trainable_variables)
        )

    return apply


def _wrap_scale_loss(original: Any) -> Any:
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
            return exchange.divide_loss(loss)

    return scale_loss


# ------------------------------------------------------------ steps, metrics, random draws


def _wrap_make_function(original: Any) -> Any:
    def _make_function(self, step_function):
        if not _distributed():
            return original(self, step_function)
        return original(self, keras_steps.wrap_step(self, step_function))

    return _make_function


def _wrap_get_metrics_result(original: Any) -> Any:
    def get_metrics_result(self):
        # Inside a step the logs are made global by the step wrapper, in
        # one exchange with the step's other log values.
        if not _distributed() or in_stateless_scope() or step_state.current().in_step:
            return original(self)
        return keras_steps.global_metric_results(self.metrics)

    return get_metrics_result


def _wrap_draw_seed(original: Any) -> Any:
    def draw_seed(seed):
        drawn = original(seed)
        if (
            step_state.current().in_step
            and (seed is None or isinstance(seed, SeedGenerator))
            and world.get().size > 1
        ):
            # A stream of its own per rank: the first key word, not the
            # counter (offsetting the counter would replay rank 0's draws
            # of later steps).
            offset = tf.constant([world.get().rank * 1_000_003, 0], dtype=drawn.dtype)
            drawn = drawn + offset
        return drawn

    return draw_seed


# ------------------------------------------------------------ install


def install() -> None:
    """Installs the Keras 3 patches (idempotent)."""
    for cls in patching.classes_defining([BaseOptimizer], "apply"):
        patching.wrap(cls, "apply", _wrap_apply)
    for cls in patching.classes_defining([BaseOptimizer], "scale_loss"):
        patching.wrap(cls, "scale_loss", _wrap_scale_loss)
    patching.wrap(TensorFlowTrainer, "_make_function", _wrap_make_function)
    patching.wrap(Trainer, "_compute_loss", adapter.wrap_compute_loss)
    patching.wrap(Trainer, "get_metrics_result", _wrap_get_metrics_result)
    # save_model: every public alias (keras.saving, keras.models, tf.keras).
    adapter.install_calls(FRAMEWORK, TensorFlowTrainer, Model, saving_api.save_model, "keras")
    for module in (tf_random, tf_image):
        patching.wrap(module, "draw_seed", _wrap_draw_seed)

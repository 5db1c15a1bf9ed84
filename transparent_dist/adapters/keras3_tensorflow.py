"""Keras 3 on its TensorFlow backend: what the backend-neutral `keras3`
cannot say without naming TensorFlow (its trainer and epoch iterator, its
random modules, `tf.data`), and the `TENSORFLOW` backend it runs on.
Every `keras.src.backend.tensorflow` import of the package is here.

```python
import keras   # KERAS_BACKEND=tensorflow
from transparent_dist.adapters import keras3_tensorflow
keras3_tensorflow.install()   # idempotent; transparent_dist's import hook calls it
```

Patched here, besides `keras3.install`'s patches:

- `TensorFlowTrainer._make_function`: each train / test step declares its
  sample count and returns global logs (`keras_steps.wrap_step`);
- `draw_seed` of the backend's random and image modules: `SeedGenerator`
  draws inside a step differ between ranks (one stream per rank).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow as tf
from keras.src import tree
from keras.src.backend.tensorflow import image as tf_image
from keras.src.backend.tensorflow import random as tf_random
from keras.src.backend.tensorflow import trainer as tf_trainer
from keras.src.backend.tensorflow.trainer import TensorFlowTrainer
from keras.src.random.seed_generator import SeedGenerator
from keras.src.trainers.data_adapters import data_adapter_utils
from keras.src.trainers.data_adapters.array_data_adapter import ArrayDataAdapter

from transparent_dist.adapters import keras3, keras_steps
from transparent_dist.core import log, patching, step_state, world
from transparent_dist.tf.backend import TENSORFLOW
from transparent_dist.tf.inputs import resume

__all__ = ["FRAMEWORK", "install"]


# ------------------------------------------------------------ the description


def _index_batches(num_samples: int, global_batch: int, shuffle: Any) -> tf.data.Dataset:
    """Global batches of sample indices in the order plain Keras 3 takes
    them: its own adapter over 0..n-1 (so, for a given TF seed, the same
    shuffle permutation as plain `fit`)."""
    return ArrayDataAdapter(
        np.arange(num_samples, dtype=np.int64), batch_size=global_batch, shuffle=shuffle
    ).get_tf_dataset()


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
    (`tf.inputs.resume.skip_first`): short for the resumed epoch, full
    after it. Left to find the end by running out of data, Keras would make
    one more step call, in which the optimizer's step counter and the
    dropout seed (which need no data) still advance."""
    original = tf_trainer.TFEpochIterator

    class ResumedEpochIterator(original):
        def _dataset(self):
            return getattr(self.data_adapter, "_dataset", None)

        def _lengths(self):
            if getattr(self, "_resumed_epoch_done", False):
                return None
            return resume.epoch_lengths(self._dataset())

        def reset(self):
            super().reset()
            if self._lengths():
                self._num_batches = self._lengths()[0]

        def _enumerate_iterator(self):
            lengths = self._lengths()
            if lengths is None:
                yield from super()._enumerate_iterator()
                return
            first, full = lengths
            # An endless dataset is read by one iterator over the epochs;
            # a length would end it (and make a new one).
            endless = resume.endless(self._dataset())
            self._resumed_epoch_done = True
            if first == 0:
                # Every step of the resumed epoch was done (a rank lost in
                # its validation, `keras_elastic`): Keras would take 0 for
                # "unknown" and call one step more to find the end.
                self.data_adapter.on_epoch_begin()
                self.data_adapter.on_epoch_end()
            elif self.steps_per_epoch:
                # The resumed epoch's steps, and no warning that the data
                # ran out: `steps_per_epoch` is the resumed epoch's.
                per_epoch, self.steps_per_epoch = self.steps_per_epoch, first
                self._num_batches = None if endless else first
                try:
                    yield from super()._enumerate_iterator()
                finally:
                    self.steps_per_epoch = per_epoch
            else:
                yield from super()._enumerate_iterator()
            self._num_batches = None if endless else full

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


FRAMEWORK = keras3.framework(
    TENSORFLOW,
    index_batches=_index_batches,
    generator_spec=_generator_spec,
    own_train_step=lambda model: type(model).train_step is TensorFlowTrainer.train_step,
    build_before_training=_build_before_training,
    exact_epochs_after_resume=_exact_epochs_after_resume,
)


# ------------------------------------------------------------ steps, random draws


def _xla_kind(model: Any, step_function: Any) -> str:
    """How a step of `model` keeps XLA under N ranks (`keras_steps`):
    Keras's own train step is split around its update, a test step
    compiled whole; a script's own train step runs plain (its update, and
    so the exchange, is somewhere inside it: `fit` said so)."""
    if not model.jit_compile:
        return keras_steps.PLAIN
    function = getattr(step_function, "__func__", step_function)
    if function is TensorFlowTrainer.train_step:
        return keras_steps.SPLIT
    if getattr(function, "__name__", "") == "test_step":
        return keras_steps.WHOLE
    return keras_steps.PLAIN


def _wrap_make_function(original: Any) -> Any:
    def _make_function(self, step_function):
        if not world.get().distributed:
            return original(self, step_function)
        xla = self.jit_compile
        step = keras_steps.wrap_step(
            self, step_function, FRAMEWORK.backend, _xla_kind(self, step_function)
        )
        # Keras's function around the step is traced plain: the step holds
        # the exchanges, host ops XLA cannot compile; what XLA can, the
        # step compiles itself.
        self._jit_compile = False
        try:
            return original(self, step)
        finally:
            self._jit_compile = xla

    return _make_function


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
    """Installs the Keras 3 patches for its TensorFlow backend (idempotent)."""
    keras3.install(FRAMEWORK, TensorFlowTrainer)
    patching.wrap(TensorFlowTrainer, "_make_function", _wrap_make_function)
    for module in (tf_random, tf_image):
        patching.wrap(module, "draw_seed", _wrap_draw_seed)

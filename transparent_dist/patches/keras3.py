"""Keras 3 (TensorFlow backend) made data-parallel, installed by `install()`.

```python
import keras
from transparent_dist.patches import keras3
keras3.install()      # idempotent; transparent_dist's import hook calls it
```

What is patched, and why there:

- every optimizer's `apply` (so `fit`, `train_on_batch` and custom
  `GradientTape` loops that call `apply_gradients` / `apply` alike): rank 0's
  weights and optimizer state are broadcast before the first update, and the
  gradients are averaged over the ranks (`gradients.average`);
- the trainer's `_make_function`: each train / test step tells the gradient
  exchange how many samples this rank holds in the step, so the mean is
  sample-weighted; `_compute_loss` makes the loss of an empty local batch 0
  instead of NaN;
- `get_metrics_result`: metric states are summed over the ranks before the
  results are computed, so every log value is the global one;
- `fit`, `evaluate`, `predict`: the data is sharded (`keras_inputs`), the
  callbacks are chosen per rank (`keras_callbacks`), XLA is turned off for
  the steps that exchange, `predict` gathers all rows on every rank;
- `Model.save`, `Model.save_weights` and `keras.saving.save_model`: rank 0
  only.

In a world of size 1 every patch calls straight through to Keras.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import tensorflow as tf
from keras.src import backend as keras_backend
from keras.src import tree
from keras.src.backend.common.stateless_scope import in_stateless_scope
from keras.src.backend.tensorflow import trainer as tf_trainer
from keras.src.backend.tensorflow.trainer import TensorFlowTrainer
from keras.src.callbacks.callback_list import CallbackList
from keras.src.models.model import Model
from keras.src.optimizers.base_optimizer import BaseOptimizer
from keras.src.optimizers.loss_scale_optimizer import LossScaleOptimizer
from keras.src.saving import saving_api
from keras.src.trainers.data_adapters import array_slicing, data_adapter_utils
from keras.src.trainers.trainer import Trainer

from transparent_dist import (
    broadcast,
    checkpoint,
    collectives,
    config,
    gradients,
    keras_callbacks,
    keras_inputs,
    keras_steps,
    log,
    output,
    patching,
    sharding,
    tf_inputs,
    world,
)
from transparent_dist.data._together import together
from transparent_dist.patches import common, tf2


def fitting() -> bool:
    """Whether this thread is inside a patched `fit`."""
    return common.is_set("fitting")


_distributed = common.distributed


# ------------------------------------------------------------ optimizers


def _wrap_apply(original: Any) -> Any:
    def apply(self, grads, trainable_variables=None):
        # A wrapping optimizer (LossScaleOptimizer) calls its inner one's
        # apply: the gradients are averaged once, by the outermost.
        if not _distributed() or common.is_set("applying"):
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
        broadcast.before_first_update(self, variables)
        if not fitting():
            tf2.warn_if_loop_data_is_whole()
        grads = gradients.average(grads)
        with common.flag("applying"):
            return original(self, grads, trainable_variables)

    return apply


def _wrap_scale_loss(original: Any) -> Any:
    def scale_loss(self, loss):
        loss = original(self, loss)
        # Only in Keras's own train step, which takes the gradients of this
        # loss straight to `apply`; once, however subclasses chain it. Not
        # under dynamic loss scaling (mixed float16): dividing by N there
        # would push small float16 gradients N times closer to underflow,
        # which is what the loss scale exists to prevent.
        if (
            not (fitting() and common.is_set("own_train_step"))
            or common.is_set("scaling")
            or isinstance(self, LossScaleOptimizer)
        ):
            return loss
        with common.flag("scaling"):
            return gradients.divide_loss(loss)

    return scale_loss


# ------------------------------------------------------------ steps, loss, metrics


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
        if not _distributed() or in_stateless_scope() or common.is_set("in_step"):
            return original(self)
        return keras_steps.global_metric_results(self.metrics)

    return get_metrics_result


# ------------------------------------------------------------ fit / evaluate / predict


def _disable_xla(model: Any) -> None:
    if _distributed() and model.jit_compile:
        model.jit_compile = False
        model.train_function = model.test_function = model.predict_function = None
        log.info(
            "jit_compile (XLA) is turned off: the gradient exchange runs MPI "
            "from inside the step, which XLA cannot compile"
        )


def _array_batches(inputs_xyw: tuple, batch_size: int | None, shuffle: Any, what: str):
    inputs, n = keras_inputs.pack_arrays(*inputs_xyw)
    return tf_inputs.shard_arrays(
        inputs, n, batch_size, shuffle, what, keras_inputs.global_batch_indices
    )


def _file_batches(
    inputs_xyw: tuple, batch_size: Any, shuffle: Any, what: str, contiguous: bool = False
):
    w = world.get()
    inputs, n = keras_inputs.pack_arrays(*inputs_xyw)
    tf_inputs.agree_on_samples(n, what)
    seed = tf_inputs.agreed_seed()  # the global batch order must agree
    return tf_inputs.file_batches(
        inputs,
        n,
        tf_inputs.global_batch(batch_size),
        bool(shuffle),
        seed,
        w.rank,
        w.size,
        contiguous,
    )


def _shard_batches(x: Any, y: Any, sample_weight: Any, batch_size: Any, shuffle: Any, what: str):
    """`(x, y, sample_weight, batch_size)` for this rank, for fit / evaluate."""
    w = world.get()
    kind = keras_inputs.kind_of(x)
    log.debug(f"{what}: {kind} ({type(x).__name__}), sharded over {w.size} ranks")
    if kind == "file":
        return _file_batches((x, y, sample_weight), batch_size, shuffle, what), None, None, None
    if kind == "arrays" and sharding.holds_rank_rows(x, y, sample_weight):
        inputs, n = keras_inputs.pack_arrays(x, y, sample_weight)
        return tf_inputs.rank_rows_batches(inputs, n, batch_size, shuffle, what), None, None, None
    if kind == "arrays":
        return _array_batches((x, y, sample_weight), batch_size, shuffle, what), None, None, None
    if kind == "dataset":
        return tf_inputs.dataset_batches(x, w.rank, w.size), y, sample_weight, batch_size
    if kind == "pydataset":
        return keras_inputs.pydataset_part(x, w.rank, w.size), y, sample_weight, batch_size
    if kind == "generator":
        return tf_inputs.generator_batches(x, w.rank, w.size), y, sample_weight, batch_size
    log.info(f"{what} of type {type(x).__name__} is not sharded: every rank uses all of it")
    return x, y, sample_weight, batch_size


def _pass_through(arguments: dict, fit: bool = False) -> bool:
    """Whether a call goes straight to Keras: one process with data plain
    Keras takes (file-backed data, and checkpointing in fit, need the plugin
    even then)."""
    if fit and config.SETTINGS.checkpoint_dir:
        return False
    return not _distributed() and keras_inputs.kind_of(arguments["x"]) != "file"


def _skip_first(dataset: tf.data.Dataset, skip: tf.Variable) -> tf.data.Dataset:
    """`dataset` less its first `skip` batches, `skip` read afresh at every
    epoch's iterator (the resumed epoch skips what it had done)."""
    resumed = tf.data.Dataset.range(1).flat_map(lambda _: dataset.skip(skip))
    full = int(dataset.cardinality())
    if full > 0:
        resumed._td_epoch_lengths = (full - int(skip.numpy()), full)
    return resumed


@contextlib.contextmanager
def _exact_epochs_after_resume() -> Iterator[None]:
    """Tells Keras the exact length of each epoch of a dataset made by
    `_skip_first`: short for the resumed epoch, full after it. Left to find
    the end by running out of data, Keras would make one more step call,
    in which the optimizer's step counter and the dropout seed (which need
    no data) still advance."""
    original = tf_trainer.TFEpochIterator

    class ResumedEpochIterator(original):
        def _lengths(self):
            dataset = getattr(self.data_adapter, "_dataset", None)
            return getattr(dataset, "_td_epoch_lengths", None)

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


def _progress_unit(x: Any, batch_size: Any) -> tuple[str, int] | None:
    """What one training step consumes, for a checkpoint's accounting:
    ("samples", global batch) for arrays and files (the global batch k is
    the same samples at any rank count), ("batches", N) for datasets and
    generators (each step takes one batch per rank); None otherwise."""
    kind = keras_inputs.kind_of(x)
    if kind == "file" or (kind == "arrays" and not sharding.holds_rank_rows(x)):
        return ("samples", tf_inputs.global_batch(batch_size))
    if kind in ("dataset", "pydataset", "generator"):
        return ("batches", world.get().size)
    return None


def _checkpointing(arguments: dict, unit: tuple[str, int] | None) -> tuple:
    """The CheckpointAndResume callback for this fit (TD_CHECKPOINT_DIR):
    proves the directory writable, loads the checkpoint all ranks resume
    from, and makes the resumed epoch's data skip what was done."""
    directory = config.SETTINGS.checkpoint_dir
    with together(f"checking {directory}"):
        if world.get().is_root:
            checkpoint.probe(directory)
    state = checkpoint.load_agreed(directory)
    skip = None
    if state is not None and state[1]["step"] > 0 and isinstance(arguments["x"], tf.data.Dataset):
        steps = checkpoint.steps_to_skip(state[1], unit, world.get().size)
        skip = tf.Variable(steps, dtype=tf.int64, trainable=False)
        arguments["x"] = _skip_first(arguments["x"], skip)
    user = arguments["callbacks"]
    user = [] if user is None or isinstance(user, CallbackList) else list(user)
    return (
        keras_callbacks.CheckpointAndResume(
            directory,
            config.SETTINGS.checkpoint_every,
            config.SETTINGS.checkpoint_keep,
            skip,
            user,
            state=state,
            unit=unit,
        ),
    )


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


def _wrap_fit(original: Any) -> Any:
    def fit(self, *args, **kwargs):
        if fitting():
            return original(self, *args, **kwargs)
        a = common.bind(original, self, args, kwargs)
        if _pass_through(a, fit=True):
            return original(self, *args, **kwargs)
        common.enter_phase("fit", a)
        common.agree_on_compile(self)
        _disable_xla(self)
        x, y, sample_weight, batch_size = a["x"], a["y"], a["sample_weight"], a["batch_size"]
        unit = _progress_unit(x, batch_size)
        if (
            a["validation_split"]
            and a["validation_data"] is None
            and keras_inputs.kind_of(x) == "arrays"
        ):
            # Split before sharding: the validation set is the last part of
            # the whole data, as in plain Keras.
            (x, y, sample_weight), a["validation_data"] = array_slicing.train_validation_split(
                (x, y, sample_weight), validation_split=a["validation_split"]
            )
            a["validation_split"] = 0.0
        a["x"], a["y"], a["sample_weight"], a["batch_size"] = _shard_batches(
            x, y, sample_weight, batch_size, a["shuffle"], "the training data"
        )
        if keras_inputs.kind_of(x) in ("arrays", "file"):
            a["shuffle"] = False  # done already, by our pipeline
        if a["validation_data"] is not None:
            vd = a["validation_data"]
            if isinstance(vd, (tuple, list)):
                vx, vy, vw = data_adapter_utils.unpack_x_y_sample_weight(tuple(vd))
            else:
                vx, vy, vw = vd, None, None
            vbatch = a["validation_batch_size"] or batch_size
            vx, vy, vw, vbatch = _shard_batches(vx, vy, vw, vbatch, False, "the validation data")
            a["validation_data"] = vx if vy is None and vw is None else (vx, vy, vw)
            a["validation_batch_size"] = vbatch
        _build_before_training(self, a["x"])
        checkpointing = bool(config.SETTINGS.checkpoint_dir)
        extra = _checkpointing(a, unit) if checkpointing else ()
        common.output_on_root_only(
            a, keras_callbacks.for_this_rank(a["callbacks"], fitting=True, extra=extra)
        )
        resuming = any(getattr(cb, "skip", None) is not None for cb in extra)
        own_step = type(self).train_step is TensorFlowTrainer.train_step
        with (
            common.flag("fitting"),
            common.flag("own_train_step") if own_step else contextlib.nullcontext(),
            _exact_epochs_after_resume() if resuming else contextlib.nullcontext(),
            checkpoint.handling_signals() if checkpointing else contextlib.nullcontext(),
        ):
            return common.call(original, a)

    return fit


def _wrap_evaluate(original: Any) -> Any:
    def evaluate(self, *args, **kwargs):
        if fitting() or kwargs.get("_use_cached_eval_dataset"):
            return original(self, *args, **kwargs)
        a = common.bind(original, self, args, kwargs)
        if _pass_through(a):
            return original(self, *args, **kwargs)
        common.enter_phase("evaluate", a)
        _disable_xla(self)
        a["x"], a["y"], a["sample_weight"], a["batch_size"] = _shard_batches(
            a["x"], a["y"], a["sample_weight"], a["batch_size"], False, "the evaluation data"
        )
        common.output_on_root_only(a, keras_callbacks.for_this_rank(a["callbacks"]))
        with common.flag("keras_call"):
            return common.call(original, a)

    return evaluate


def _wrap_predict(original: Any) -> Any:
    def predict(self, *args, **kwargs):
        w = world.get()
        a = common.bind(original, self, args, kwargs)
        if _pass_through(a):
            return original(self, *args, **kwargs)
        common.enter_phase("predict", a)
        _disable_xla(self)
        x, kind, gather = a["x"], keras_inputs.kind_of(a["x"]), _distributed()
        if kind == "file":
            a["x"] = _file_batches(
                (x,), a["batch_size"], False, "the data to predict", contiguous=True
            )
            a["batch_size"] = None
        elif kind == "arrays" and sharding.holds_rank_rows(x):
            gather = False  # this rank's rows in, this rank's predictions out
        elif kind == "arrays":
            _, n = keras_inputs.pack_arrays(x)
            tf_inputs.agree_on_samples(n, "the data to predict")
            a["x"] = tf_inputs.array_block(x, n, w.rank, w.size)
        elif kind == "dataset":
            block = tf_inputs.dataset_block(x, w.rank, w.size)
            gather = gather and block is not None
            a["x"] = x if block is None else block
        elif kind == "pydataset":
            a["x"] = keras_inputs.pydataset_part(x, w.rank, w.size, contiguous=True)
        else:
            gather = False
        common.output_on_root_only(a, keras_callbacks.for_this_rank(a["callbacks"]))
        with common.flag("keras_call"):
            outputs = common.call(original, a)
        if not gather:
            return outputs
        return tree.map_structure(lambda o: collectives.allgather_rows(o, w.comm), outputs)

    return predict


# ------------------------------------------------------------ saving


def _patch_saving() -> None:
    patching.wrap(Model, "save", output.root_only)
    patching.wrap(Model, "save_weights", output.root_only)
    # Every public alias of save_model (keras.saving, keras.models, tf.keras).
    patching.wrap_everywhere(saving_api.save_model, output.root_only, "keras")


# ------------------------------------------------------------ install


def install() -> None:
    """Installs the Keras 3 patches (idempotent)."""
    for cls in common.classes_defining([BaseOptimizer], "apply"):
        patching.wrap(cls, "apply", _wrap_apply)
    for cls in common.classes_defining([BaseOptimizer], "scale_loss"):
        patching.wrap(cls, "scale_loss", _wrap_scale_loss)
    patching.wrap(TensorFlowTrainer, "_make_function", _wrap_make_function)
    patching.wrap(Trainer, "_compute_loss", common.wrap_compute_loss)
    patching.wrap(Trainer, "get_metrics_result", _wrap_get_metrics_result)
    patching.wrap(TensorFlowTrainer, "fit", _wrap_fit)
    patching.wrap(TensorFlowTrainer, "evaluate", _wrap_evaluate)
    patching.wrap(TensorFlowTrainer, "predict", _wrap_predict)
    _patch_saving()
    keras_steps.install_random()

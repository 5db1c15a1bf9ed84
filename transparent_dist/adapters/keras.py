"""The one Keras adapter, for Keras 3 and tf_keras alike: what `fit`,
`evaluate`, `predict`, the optimizers and the steps do under N ranks.

```python
import keras
from transparent_dist.adapters import keras3_tensorflow
keras3_tensorflow.install()   # idempotent; the import hook calls it (tf_keras.install alike)
```

A framework is described by a `Framework` (`keras3_tensorflow.FRAMEWORK`,
`tf_keras.FRAMEWORK`): its classes, its private helpers and how to reach
its train step. Everything else is written here once:

- the optimizer's update (`update`): rank 0's weights and optimizer state
  are broadcast before the first update, the gradients averaged (both
  through the framework's `Backend`, `core.backend`), and in a custom loop
  the preemption service sees the step (`custom_loops`);
- `fit`, `evaluate`, `predict` (`wrap_fit` ...): the data is classified
  once and sharded by one `ShardPlan` (`tf.inputs`), the callbacks chosen
  per rank (`keras_callbacks`), XLA turned off for the steps that
  exchange, a checkpoint-enabled fit resumed and preempted
  (`core.preemption`), and `predict` gathers all rows on every rank;
  `predict` and `evaluate` of fewer samples than ranks run whole on every
  rank (`tf.inputs.fewer_than_ranks`), as one process runs them;
- the loss of an empty local batch is 0, not NaN (`wrap_compute_loss`).

The data side (`tf.inputs`: classifying, sharding, `tf.data` pipelines)
is TensorFlow's for every backend: Keras 3 takes a `tf.data.Dataset` under
any of its backends.

In a world of size 1 every patch calls straight through to Keras.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

from transparent_dist.adapters import (
    calls,
    custom_loops,
    keras_callbacks,
    keras_elastic,
    keras_identity,
    root_output,
    step_counts,
)
from transparent_dist.core import (
    checkpoint,
    config,
    elastic,
    log,
    output,
    patching,
    preemption,
    step_state,
    world,
)
from transparent_dist.core.backend import Backend
from transparent_dist.tf import inputs as tf_inputs

__all__ = [
    "Framework",
    "callbacks_of",
    "fitting",
    "update",
    "wrap_evaluate",
    "wrap_fit",
    "wrap_predict",
]


@dataclasses.dataclass(frozen=True, eq=False)
class Framework:
    """What the one adapter needs to know of a Keras.

    Attributes:
        name: "keras" or "tf_keras".
        backend: the tensor library's `Backend` (gradients, metric states,
            variables, batches).
        callback_base, callback_list: its `Callback` and `CallbackList`.
        root_only_callbacks: callbacks that write or print (rank 0 only).
        backup_and_restore: its `BackupAndRestore`, which writes on rank 0
            only (`silence_backup` on the others).
        arrays: its `tf_inputs.ArrayFormat` (array packing, batch order,
            its sequence class).
        split_validation: `((x, y, w), split) -> ((x, y, w), validation)`.
        unpack: `data -> (x, y, sample_weight)`.
        turn_off_xla: `(model, training) -> bool`: turns XLA off where
            the gradient exchange would be inside a compiled step (in `fit`
            if `training`), True if it did.
        build_optimizer: `(optimizer, variables)` builds an unbuilt one.
        learning_rate: `optimizer -> variable` (None for a schedule).
        own_train_step: `model -> bool`, its train step is the framework's.
        build_before_training: `(model, dataset)` builds a lazy model.
        exact_epochs_after_resume: a context that makes the epoch loop take
            the resumed epoch's length from `resumable`'s marks.
        root_counts: a context in which only rank 0's metric states count
            (every rank evaluates the same data whole), or None: then data
            with fewer samples than ranks cannot be evaluated.
        after_loss: `model ->` a context for `fit` run again after a lost
            rank (`keras_elastic`): what the ended run left on the model
            dropped, the framework's own resume kept out, so that it starts
            at the epoch and step the survivors agreed on.
    """

    name: str
    backend: Backend
    callback_base: type
    callback_list: type
    root_only_callbacks: tuple[type, ...]
    backup_and_restore: type
    arrays: tf_inputs.ArrayFormat
    split_validation: Callable[[tuple, float], tuple]
    unpack: Callable[[Any], tuple]
    turn_off_xla: Callable[[Any, bool], bool]
    build_optimizer: Callable[[Any, list], None]
    learning_rate: Callable[[Any], Any]
    own_train_step: Callable[[Any], bool]
    silence_backup: Callable[[Any], None]
    build_before_training: Callable[[Any, Any], None] = lambda model, data: None
    exact_epochs_after_resume: Callable[[], Any] = contextlib.nullcontext
    root_counts: Callable[[], Any] | None = None
    after_loss: Callable[[Any], Any] = lambda model: contextlib.nullcontext()

    @staticmethod
    def fitting() -> bool:
        return fitting()

    def classify_validation(self, validation_data: Any) -> tf_inputs.Data:
        """`fit`'s `validation_data` (a dataset, or a tuple Keras unpacks)
        classified as its training data is."""
        vd = validation_data
        vx, vy, vw = self.unpack(tuple(vd)) if isinstance(vd, (tuple, list)) else (vd, None, None)
        return tf_inputs.classify(vx, vy, vw, self.arrays)


def callbacks_of(module: Any) -> dict[str, Any]:
    """The `Framework` fields a Keras's `callbacks` module gives (Keras 3's
    and tf_keras's name the same classes)."""
    return {
        "callback_base": module.Callback,
        "callback_list": module.CallbackList,
        "root_only_callbacks": (
            module.ModelCheckpoint,
            module.CSVLogger,
            module.TensorBoard,
            module.RemoteMonitor,
            module.ProgbarLogger,
        ),
        "backup_and_restore": module.BackupAndRestore,
    }


def fitting() -> bool:
    """Whether this thread is inside a patched `fit`."""
    return step_state.current().fitting


# ------------------------------------------------------------ the update


def update(
    backend: Backend,
    optimizer: Any,
    grads: list,
    variables: list,
    apply: Callable[[list], Any],
) -> Any:
    """One optimizer update under N ranks: rank 0's variables and optimizer
    state everywhere before the first one, then `apply(averaged grads)`.
    A wrapping optimizer (LossScaleOptimizer) calls its inner one's update:
    the gradients are averaged once, by the outermost."""
    backend.before_first_update(optimizer, variables)
    in_loop = not fitting()
    if in_loop:
        custom_loops.warn_if_loop_data_is_whole()
    averaged = backend.average(grads)
    # Under ULFM the whole update (its step counter too) waits for the
    # exchange, so a rank whose exchange failed holds the step before it
    # (`keras_elastic`); the counter alone waiting would leave the layers
    # of the buckets exchanged before a loss updated (docs/elastic.md).
    # Elsewhere nothing changes.
    ordered = backend.after(averaged) if elastic.available() else contextlib.nullcontext()
    with step_state.within(applying=True), ordered:
        if in_loop:
            return custom_loops.applied(optimizer, variables, lambda: apply(averaged))
        if step_state.current().compiled_update:
            # A split step's update, after its exchange: XLA again.
            return backend.compiled(lambda: apply(averaged))
        return apply(averaged)


# ------------------------------------------------------------ loss


def wrap_compute_loss(backend: Backend) -> Callable[[Any], Any]:
    """A patch for a trainer's loss method: 0 when this rank's batch is
    empty (a mean over no samples is NaN; such a rank counts as nothing)."""

    def wrap(original: Any) -> Any:
        def compute_loss(self, *args, **kwargs):
            loss = original(self, *args, **kwargs)
            return backend.zero_if_empty(loss) if world.get().distributed else loss

        return compute_loss

    return wrap


# ------------------------------------------------------------ fit / evaluate / predict


def _turn_off_xla(fw: Framework, model: Any, training: bool = False) -> None:
    if world.get().distributed and fw.turn_off_xla(model, training):
        model.train_function = model.test_function = model.predict_function = None
        log.info(
            "jit_compile (XLA) is turned off: the gradient exchange runs MPI "
            "from inside the train step, which XLA cannot compile"
        )


def _pass_through(arguments: dict, fit: bool = False) -> bool:
    """Whether a call goes straight to Keras: one process with data plain
    Keras takes (file-backed data, and checkpointing in fit, need the plugin
    even then)."""
    if fit and config.SETTINGS.checkpoint_dir:
        return False
    return not world.get().distributed and not tf_inputs.is_file_backed(arguments["x"])


def _sharded(data: tf_inputs.Data, batch_size: Any, shuffle: Any, what: str) -> tuple:
    plan = tf_inputs.plan_for(batch_size, shuffle and data.in_pipeline)
    return tf_inputs.for_training(data, plan, what, batch_size)


def _for_evaluation(fw: Framework, data: tf_inputs.Data, batch_size: Any, what: str) -> tuple:
    """`((x, y, sample_weight, batch_size), whole)` for evaluating `data` on
    this rank. Data with fewer samples (or batches) than ranks is not split
    (no rank may get an empty batch, which layers such as Conv1D and LSTM
    cannot take): every rank evaluates all of it in one process's batches,
    and `whole` says that only rank 0's metric states must count."""
    if fw.root_counts is not None:
        data, small = tf_inputs.fewer_than_ranks(data, what)
        if small:
            plan = tf_inputs.whole_plan(batch_size)
            return tf_inputs.for_training(data, plan, what, batch_size), True
    return _sharded(data, batch_size, False, what), False


def _shard_validation(fw: Framework, a: dict, batch_size: Any) -> bool:
    """Shards fit's validation data in `a`; True if every rank takes it
    whole (`_for_evaluation`)."""
    vd = a["validation_data"]
    if vd is None:
        return False
    data = fw.classify_validation(vd)
    vbatch = a["validation_batch_size"] or batch_size
    (vx, vy, vw, vbatch), whole = _for_evaluation(fw, data, vbatch, "the validation data")
    a["validation_data"] = vx if vy is None and vw is None else (vx, vy, vw)
    a["validation_batch_size"] = vbatch
    return whole


def _checkpointing(
    fw: Framework, a: dict, unit: tuple[str, int] | None, data: tf_inputs.Data
) -> Any:
    """The CheckpointAndResume callback for this fit (TD_CHECKPOINT_DIR):
    the service proves the directory writable and picks the checkpoint all
    ranks resume from; the resumed epoch's data skips what was done
    (`Backend.skip_batches`)."""
    service = preemption.Service.from_settings()
    state = service.resume(*keras_identity.of_fit(fw, a["self"], data, a["epochs"]))
    skip = None
    if state is not None:
        meta = state[1]
        a["initial_epoch"] = max(int(a["initial_epoch"] or 0), int(meta["epoch"]))
        resumed = None
        if meta["step"] > 0:
            resumed = fw.backend.skip_batches(
                a["x"], lambda: checkpoint.steps_to_skip(meta, unit, world.get().size)
            )
        if resumed is not None:
            a["x"], skip = resumed
    user = a["callbacks"]
    user = [] if user is None or isinstance(user, fw.callback_list) else list(user)
    made = keras_callbacks.for_framework(fw)
    return made.CheckpointAndResume(service, skip, user, state=state, unit=unit)


def _fit(fw: Framework, original: Any, a: dict, resume: Any = None, position: Any = None) -> Any:
    """One run of Keras's `fit` under N ranks: the data sharded over this
    world, the callbacks chosen for this rank. After a lost rank
    (`keras_elastic`), `resume` says the epoch and step to go on from, and
    `position` (a callback) notes where the run gets to."""
    self = a["self"]
    x, y, sample_weight, batch_size = a["x"], a["y"], a["sample_weight"], a["batch_size"]
    data = tf_inputs.classify(x, y, sample_weight, fw.arrays)
    if a["validation_split"] and a["validation_data"] is None and data.kind == "arrays":
        # Split before sharding: the validation set is the last part
        # of the whole data, as in plain Keras.
        (x, y, sample_weight), a["validation_data"] = fw.split_validation(
            (x, y, sample_weight), a["validation_split"]
        )
        a["validation_split"] = 0.0
        data = tf_inputs.classify(x, y, sample_weight, fw.arrays)
    unit = data.progress_unit(batch_size)
    a["x"], a["y"], a["sample_weight"], a["batch_size"] = _sharded(
        data, batch_size, a["shuffle"], "the training data"
    )
    if data.in_pipeline or data.kind == "generator":
        # Done already by our pipeline; a generator's batches come
        # in its order (and Keras would warn about the dataset we
        # made of it, from every rank).
        a["shuffle"] = False
    passes = step_counts.before_validation_is_sharded(fw, a, data, batch_size)
    whole_validation = _shard_validation(fw, a, batch_size)
    step_counts.adjust(a, passes)
    fw.build_before_training(self, a["x"])
    checkpointer = None
    if config.SETTINGS.checkpoint_dir:
        # After a loss, the service of the run before goes on (keras_elastic).
        checkpointer = (
            _checkpointing(fw, a, unit, data) if resume is None else position.checkpointer
        )
    made = keras_callbacks.for_framework(fw)
    extra: tuple = () if resume is not None else (made.FitStart(data, batch_size),)
    extra += () if checkpointer is None else (checkpointer,)
    if position is not None:
        position.data_steps = fw.backend.num_batches(a["x"])
    if resume is not None:
        a["initial_epoch"] = resume.epoch
        if resume.skipped:
            # The resumed epoch is its steps left, where the data's length
            # does not say the epoch's (endless, or unknown: counted).
            full = a["steps_per_epoch"] or resume.steps
            epoch_steps = (full - resume.step, full) if full else None
            skipped = fw.backend.skip_batches(a["x"], lambda: resume.skipped, epoch_steps)
            if skipped is None:
                raise RuntimeError(
                    "transparent_dist: after the lost rank, this data cannot be resumed "
                    f"mid-epoch (step {resume.step}): only a tf.data pipeline can"
                )
            a["x"], position.skip = skipped
    extra += () if position is None else (position,)
    callbacks = made.for_this_rank(a["callbacks"], True, extra)
    if position is not None:
        callbacks = position.continued(callbacks, a["callbacks"])
    root_output.output_on_root_only(a, callbacks)
    resuming = (checkpointer is not None and checkpointer.skip is not None) or (
        position is not None and position.skip is not None
    )
    with (
        step_state.within(
            fitting=True,
            own_train_step=bool(fw.own_train_step(self)),
            whole_validation=whole_validation,
        ),
        fw.exact_epochs_after_resume() if resuming else contextlib.nullcontext(),
        preemption.handling_signals() if checkpointer is not None else contextlib.nullcontext(),
        fw.after_loss(self) if resume is not None else contextlib.nullcontext(),
    ):
        return calls.call(original, a)


def wrap_fit(fw: Framework) -> Callable[[Any], Any]:
    def wrap(original: Any) -> Any:
        def fit(self, *args, **kwargs):
            if fitting():
                return original(self, *args, **kwargs)
            a = calls.bind(original, self, args, kwargs)
            if _pass_through(a, fit=True):
                return original(self, *args, **kwargs)
            calls.enter_phase("fit", a)
            calls.agree_on_compile(self)
            _turn_off_xla(fw, self, training=True)
            if not elastic.available():
                return _fit(fw, original, a)
            return keras_elastic.fit(
                fw,
                self,
                a,
                lambda args, resume, position: _fit(fw, original, args, resume, position),
            )

        return fit

    return wrap


def _call_on_this_rank(fw: Framework, original: Any, a: dict) -> Any:
    """`evaluate` / `predict` with this rank's callbacks and output."""
    made = keras_callbacks.for_framework(fw)
    root_output.output_on_root_only(a, made.for_this_rank(a["callbacks"]))
    with step_state.within(keras_call=True):
        return calls.call(original, a)


def wrap_evaluate(fw: Framework) -> Callable[[Any], Any]:
    def wrap(original: Any) -> Any:
        def evaluate(self, *args, **kwargs):
            if fitting() or kwargs.get("_use_cached_eval_dataset"):
                # fit's validation, taken whole by every rank: rank 0's states.
                whole = (
                    kwargs.get("_use_cached_eval_dataset") and step_state.current().whole_validation
                )
                with fw.root_counts() if whole else contextlib.nullcontext():
                    return original(self, *args, **kwargs)
            a = calls.bind(original, self, args, kwargs)
            if _pass_through(a):
                return original(self, *args, **kwargs)
            calls.enter_phase("evaluate", a)
            _turn_off_xla(fw, self)
            data = tf_inputs.classify(a["x"], a["y"], a["sample_weight"], fw.arrays)
            batch_size = a["batch_size"]
            (a["x"], a["y"], a["sample_weight"], a["batch_size"]), whole = _for_evaluation(
                fw, data, batch_size, "the evaluation data"
            )
            if not whole:
                step_counts.adjust_evaluate(a, data, batch_size)
            with fw.root_counts() if whole else contextlib.nullcontext():
                return _call_on_this_rank(fw, original, a)

        return evaluate

    return wrap


def wrap_predict(fw: Framework) -> Callable[[Any], Any]:
    def wrap(original: Any) -> Any:
        def predict(self, *args, **kwargs):
            a = calls.bind(original, self, args, kwargs)
            if _pass_through(a):
                return original(self, *args, **kwargs)
            calls.enter_phase("predict", a)
            _turn_off_xla(fw, self)
            data = tf_inputs.classify(a["x"], None, None, fw.arrays)
            plan = tf_inputs.plan_for(a["batch_size"])
            a["x"], gather = tf_inputs.for_prediction(data, plan, "the data to predict")
            if data.kind == "file":
                a["batch_size"] = None
            outputs = _call_on_this_rank(fw, original, a)
            if not gather:
                return outputs
            return calls.gathered_rows(outputs)

        return predict

    return wrap


def install_calls(fw: Framework, trainer: type, model: type, save_model: Any, prefix: str) -> None:
    """Patches `trainer`'s fit / evaluate / predict with this adapter, and
    makes `model`'s save / save_weights and every alias of `save_model`
    (under the modules named `prefix`...) write on rank 0 only."""
    patching.wrap(trainer, "fit", wrap_fit(fw))
    patching.wrap(trainer, "evaluate", wrap_evaluate(fw))
    patching.wrap(trainer, "predict", wrap_predict(fw))
    patching.wrap(model, "save", output.root_only)
    patching.wrap(model, "save_weights", output.root_only)
    patching.wrap_everywhere(save_model, output.root_only, prefix)

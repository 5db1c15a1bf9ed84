"""`fit` going on with the survivors when a rank is lost (MPI ULFM).

```python
from transparent_dist.adapters import keras_elastic
history = keras_elastic.fit(fw, model, arguments, run)   # run(arguments, resume, position)
```

`run` is the adapter's fit (sharding, callbacks, Keras's own `fit`). When
it raises because a rank was lost (`core.elastic.recover` turns that into
a world of the survivors, or raises it again), the survivors go back to the
last step every one of them completed and run `fit` again from there, over
the new world:

- The step: the optimizer's step counter (`iterations`) says how many
  updates a rank's variables hold, whatever the step was doing when the
  error came (an update is applied after its exchange, and the counter is
  advanced with it), so the least over the survivors is the last step all
  completed, and a rank holding it has that step's state. That rank (the
  lowest such) broadcasts its model and optimizer variables: no copy is
  kept while nothing fails.
- The data: the epoch and its step at that count (`FitPosition`, noted at
  each epoch's start), so the rest of the epoch is the same global batches,
  re-split over the survivors (`Backend.skip_batches`, the exact epoch
  lengths of a resume).
- The history: the epochs done before, put back in front of the new run's.
- The steps: traced again, for the new world's size.
- The script's callbacks go on as if nothing was lost (`_Continued`): no
  second `on_train_begin`, no second `on_epoch_begin` for the epoch they
  are in, the resumed epoch's batches numbered on from the step resumed
  at. A rank that takes over from a lost rank 0 starts the callbacks that
  write (run on rank 0 only) there: a `CSVLogger` appends to the file rank
  0 wrote, a `BackupAndRestore` writes again. The `TD_CHECKPOINT_DIR`
  service goes on, its step count back at the agreed step.
- A loss after an epoch's last step but before its callbacks' epoch end
  (in the validation pass): the epoch's validation and end run again, with
  its training logs as its last step gave them.

The world's `batch_ranks` keeps the global batch of the per-rank batch
setting: each survivor takes a larger share of the same global batch. A
`tf.data` dataset the script batched gave each rank one of its batches per
step: a step after the loss is the same batches, joined and split by rows
over the survivors (`tf.inputs.pipelines.balanced_rounds`). Data that cannot
be re-split so (a Python generator, which cannot go back; a `PyDataset`;
rows each rank read for itself, of which the lost rank's are gone) ends the
job instead, naming the reason and the checkpoint to resume from.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from transparent_dist.adapters import keras_callback_state, keras_callbacks, root_output
from transparent_dist.core import collectives, elastic, log, shard_plan, unique, world
from transparent_dist.tf import broadcast
from transparent_dist.tf import inputs as tf_inputs
from transparent_dist.tf.inputs import pipelines

__all__ = ["Resume", "fit"]


@dataclasses.dataclass(frozen=True)
class Resume:
    """Where a fit goes on after a loss: `epoch` (0-based), the steps of it
    done (`step`), the optimizer's step count (`iterations`), the epochs'
    history before, and the epoch's steps (None if unknown). `begun`: the
    callbacks had that epoch's `on_epoch_begin`; `logs`: the epoch's
    training logs when only its validation and end are left (all its steps
    done), else None."""

    epoch: int
    step: int
    iterations: int
    history: dict | None
    steps: int | None = None
    begun: bool = False
    logs: dict | None = None
    batches: int | None = None

    @property
    def skipped(self) -> int:
        """The batches of the training data the resumed run skips: the
        epoch's steps done, or (`batches`) every step since the data's
        iterator was made, where the framework reads one across epochs."""
        return self.step if self.batches is None else self.batches


class _FitPosition:
    """Notes each epoch's start (its number, the optimizer's step count, the
    steps already done in it), the last epoch whose callbacks began and
    ended, and the last step's logs, for a recovery; a resumed epoch's skip
    counter is set to 0 at its end, and the earlier epochs' history put
    back. `earlier`: the position of the run before the loss, whose notes
    go on."""

    def __init__(self, resume: Resume | None = None, skip: Any = None, earlier: Any = None) -> None:
        super().__init__()
        self.epoch, self.start, self.offset = 0, 0, 0
        self.resume, self.skip = resume, skip
        # A resumed run's `params["steps"]` is its first (short) epoch's.
        self.full_steps = None if resume is None else resume.steps
        # The script's callbacks this rank has run, the plugin's checkpointer,
        # the last epochs begun and ended, the TD_CHECKPOINT_DIR step count
        # less the optimizer's, the last step's logs.
        self.delivered: list = [] if earlier is None else earlier.delivered
        self.checkpointer: Any = None if earlier is None else earlier.checkpointer
        self.began = -1 if earlier is None else earlier.began
        self.ended = -1 if earlier is None else earlier.ended
        self.base = 0 if earlier is None else earlier.base
        self.logs: dict | None = None if resume is None else resume.logs
        # This run's first epoch: the optimizer's step count and the
        # batches skipped then; and the length of the data fit was given
        # (`data_steps`, set by the adapter; None if not a dataset).
        self.first: tuple[int, int] | None = None
        self.data_steps: int | None = None
        # The steps of a whole epoch as counted here (a dataset of unknown
        # length: Keras's `params` do not say), and this epoch's first and
        # last step numbers.
        self.counted: int | None = None if earlier is None else earlier.counted
        self.batches: list[int] = []

    def _restore_history(self) -> None:
        resume = self.resume
        if resume is not None and resume.history is not None:
            keras_callback_state.restore_history(self.model, resume.history)
            self.resume = dataclasses.replace(resume, history=None)

    def _make_files(self) -> None:
        for callback in self.delivered:
            file = getattr(callback, "csv_file", None)
            if _is(callback, "CSVLogger") and file is not None and not callback.append:
                # tf_keras's file (a GFile) is made at its first row: made
                # now, so that a rank taking over from a rank 0 lost before
                # that row appends to this fit's file, not to an older one.
                file.write("")

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        if self.resume is None and self.began < 0:
            self._make_files()  # after every callback's on_train_begin
        self._restore_history()
        first = self.first is None
        resume = self.resume
        # Steps of this epoch done before this run (the resumed epoch's).
        self.offset = resume.step if first and resume is not None else 0
        self.epoch, self.start = epoch, int(self.model.optimizer.iterations.numpy())
        if first:
            skipped = int(self.skip.numpy()) if self.skip is not None else 0
            self.first = (self.start, skipped)
        self.began = max(self.began, epoch)
        self.batches = []
        if self.checkpointer is not None:
            self.base = self.checkpointer.service.global_step - self.start

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        if not self.batches:
            self.batches = [batch, batch]

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        # Keras made these plain numbers for the callbacks already.
        self.logs = logs
        if self.batches:
            self.batches[1] = batch

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if self.skip is not None and self.data_steps != _INFINITE:
            # The epochs after the resumed one read whole passes (an endless
            # dataset's one iterator may be made in the next epoch).
            self.skip.assign(0)
        resume = self.resume
        if resume is not None and resume.logs and logs is not None and epoch == resume.epoch:
            # No step ran in this epoch here: its training logs are the
            # ones its last step gave before the loss (validation's added).
            for key, value in resume.logs.items():
                logs.setdefault(key, value)
        # The script's callbacks, after this one, get this epoch's end.
        self.ended = max(self.ended, epoch)
        if self.batches and not self.model.stop_training:
            # tf_keras numbers a resumed epoch's steps on from the step.
            first, last = self.batches
            done = last + 1 if first == self.offset and first else self.offset + last - first + 1
            self.counted = max(self.counted or 0, done)

    def on_train_end(self, logs: Any = None) -> None:
        self._restore_history()

    def steps(self) -> int | None:
        """A whole epoch's steps (None if unknown)."""
        given = self.full_steps or (getattr(self, "params", None) or {}).get("steps")
        return given or self.counted

    def continued(self, callbacks: Any, user: Any) -> Any:
        """The callbacks a run of fit gets, from the list `for_this_rank`
        made of the script's (`user`) and the plugin's: the first run's as
        they are (noting the script's and the checkpointer); after a loss
        the script's go on where they were (`_Continued`)."""
        if not isinstance(callbacks, list):
            return callbacks  # a CallbackList the script assembled
        user = list(user) if isinstance(user, (list, tuple)) else []
        theirs = [c for c in callbacks if any(c is u for u in user)]
        if self.resume is None:
            self.delivered = theirs
            made = keras_callbacks.for_framework(self.framework)
            self.checkpointer = next(
                (c for c in callbacks if isinstance(c, made.CheckpointAndResume)), None
            )
            return callbacks
        wrapper = _continued_class(self.framework.callback_base)
        out = []
        for callback in callbacks:
            if any(callback is c for c in theirs):
                fresh = not any(callback is c for c in self.delivered)
                callback = wrapper(callback, fresh, self.resume)
            out.append(callback)
        self.delivered = self.delivered + [c for c in theirs if c not in self.delivered]
        return out


@functools.cache
def _position_class(base: type) -> type:
    return type("FitPosition", (_FitPosition, base), {})


def position(fw: Any, resume: Resume | None = None, earlier: Any = None) -> Any:
    """The `FitPosition` callback over `fw`'s `Callback`."""
    made = _position_class(fw.callback_base)(resume, None, earlier)
    made.framework = fw
    return made


# Callback methods passed on as they are.
_HOOKS = (
    "on_train_end",
    "on_test_begin",
    "on_test_end",
    "on_predict_begin",
    "on_predict_end",
    "on_test_batch_begin",
    "on_test_batch_end",
    "on_predict_batch_begin",
    "on_predict_batch_end",
    "on_epoch_end",
)


class _Continued:
    """One of the script's callbacks in the fit run again after a loss: it
    gets no second `on_train_begin` (unless `fresh`: it never ran on this
    rank, as a writing callback on the rank that took over from a lost rank
    0), no second `on_epoch_begin` for the epoch it was in, and the resumed
    epoch's batches numbered on from the step resumed at. A fresh
    `CSVLogger` appends to the file written before the loss."""

    def __init__(self, inner: Any, fresh: bool, resume: Resume) -> None:
        super().__init__()
        self.inner, self.fresh, self.resume = inner, fresh, resume
        self._offset, self._first = 0, False
        if world.get().is_root:
            # Silenced while this rank was not rank 0 (`silence_backup`).
            for name, value in list(vars(inner).items()):
                if value is root_output.no_op:
                    delattr(inner, name)

    def set_model(self, model: Any) -> None:
        super().set_model(model)
        self.inner.set_model(model)

    def set_params(self, params: Any) -> None:
        super().set_params(params)
        self.inner.set_params(params)

    def on_train_begin(self, logs: Any = None) -> None:
        if not self.fresh:
            return
        if _is(self.inner, "CSVLogger"):
            # The rows of the epochs before the loss are in its file.
            append, self.inner.append = self.inner.append, True
            try:
                self.inner.on_train_begin(logs)
            finally:
                self.inner.append = append
            return
        self.inner.on_train_begin(logs)

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        resumed = epoch == self.resume.epoch
        self._offset = self.resume.step if resumed else 0
        self._first = resumed
        if not (resumed and self.resume.begun and not self.fresh):
            self.inner.on_epoch_begin(epoch, logs)

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        if self._first:
            self._first = False
            if batch != 0:
                # tf_keras numbers a resumed epoch's batches on from the
                # step itself (Keras 3 from 0).
                self._offset = 0
        self.inner.on_train_batch_begin(batch + self._offset, logs)

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.inner.on_train_batch_end(batch + self._offset, logs)

    def on_batch_begin(self, batch: int, logs: Any = None) -> None:
        self.on_train_batch_begin(batch, logs)

    def on_batch_end(self, batch: int, logs: Any = None) -> None:
        self.on_train_batch_end(batch, logs)


def _passed_on(name: str) -> Callable[..., Any]:
    def hook(self: _Continued, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.inner, name)(*args, **kwargs)

    hook.__name__ = name
    return hook


for _name in _HOOKS:
    setattr(_Continued, _name, _passed_on(_name))


def _is(callback: Any, name: str) -> bool:
    return any(cls.__name__ == name for cls in type(callback).__mro__)


@functools.cache
def _continued_class(base: type) -> type:
    return type("Continued", (_Continued, base), {})


def _state_variables(fw: Any, model: Any) -> list[Any]:
    optimizer = model.optimizer
    rate = fw.learning_rate(optimizer)
    return unique.by_identity(
        [
            *model.variables,
            *broadcast.optimizer_variables(optimizer),
            *([] if rate is None else [rate]),
        ]
    )


def _roll_back(fw: Any, model: Any, noted: Any, history: dict | None) -> Resume:
    """Every survivor back at the last step all of them completed, from the
    lowest survivor that holds it (collective over the survivors). An epoch
    whose steps are all done goes on after its end if rank 0 (now) had that
    end, else its validation and end run again."""
    w = world.get()
    done = int(model.optimizer.iterations.numpy())
    steps = noted.steps() or -1
    record = np.array(
        [done, noted.epoch, noted.start, noted.offset, steps, noted.began, noted.ended], np.int64
    )
    table = collectives.allgather_records(record, w.comm, "agreement check")
    log.debug(
        "after the loss: [iterations, epoch, its start, its offset, steps, began, ended] "
        f"{table.tolist()}"
    )
    least = int(table[:, 0].min())
    source = int(np.flatnonzero(table[:, 0] == least)[0])
    _, epoch, start, offset, steps, _, _ = (int(v) for v in table[source])
    broadcast.variables(_state_variables(fw, model), root=source, what="model and optimizer state")
    step = offset + least - start
    logs = None
    if steps > 0 and step >= steps:
        if int(table[0, 6]) >= epoch:
            epoch, step = epoch + 1, 0
        else:
            logs = dict(noted.logs or {})
    began = int(table[0, 5]) >= epoch
    return Resume(epoch, step, least, history, steps if steps > 0 else None, began, logs)


def _go_on_checkpointing(noted: Any, resume: Resume) -> None:
    """The TD_CHECKPOINT_DIR service of the run before the loss, for the
    next: its step count at the agreed step, nothing pending."""
    checkpointer = noted.checkpointer
    if checkpointer is None:
        return
    checkpointer.service.global_step = resume.iterations + noted.base
    checkpointer._pending = 0
    checkpointer._resume_step = resume.step
    checkpointer.skip = None
    checkpointer._again = checkpointer._metric_sums = checkpointer._history = None


# Data a lost rank's survivors cannot re-split with the same global batches,
# by its kind (`tf_inputs.Data.kind`), for the training data (the
# validation data is summed over every sample whatever the split).
_CANNOT_GO_ON = {
    "generator": "a Python generator, which cannot go back to the last step every rank completed",
    "sequence": "a keras.utils.PyDataset, which is dealt to the ranks in whole batches and "
    "cannot go back to the last step every rank completed",
    "rank rows": "already split by rank (a transparent_dist.data reader): the lost rank's "
    "rows are on no survivor",
    "other": "not split by the plugin, so not resumable mid-epoch",
}
_VALIDATION_CANNOT_GO_ON = ("generator", "rank rows")
_INFINITE = -1  # tf.data.INFINITE_CARDINALITY


def _training_kind(fw: Any, arguments: dict) -> str:
    x, y, weights = (arguments.get(name) for name in ("x", "y", "sample_weight"))
    return tf_inputs.classify(x, y, weights, fw.arrays).kind


def _why_not_go_on(
    fw: Any, arguments: dict, noted: Any = None, resume: Resume | None = None
) -> str | None:
    """Why the survivors cannot go on with fit's data (see the module's
    docstring), or None."""
    kind = _training_kind(fw, arguments)
    if kind in _CANNOT_GO_ON:
        return f"the training data is {_CANNOT_GO_ON[kind]}"
    x = arguments.get("x")
    if kind == "dataset" and not pipelines.joinable(x.element_spec):
        return (
            "the training data is a tf.data dataset whose batches differ in shape past their "
            "first dimension (padded_batch pads each to its own length): the survivors keep "
            "each step's samples by joining its batches, which these cannot be"
        )
    mid_epoch = resume is not None and resume.logs is None and resume.skipped > 0
    if kind == "dataset" and mid_epoch and pipelines.reshuffles(x):
        # Its order is drawn anew by each iterator made of it, the
        # interrupted pass's is gone: going on would repeat some samples
        # and leave others out.
        return (
            "the training data is a tf.data dataset that reshuffles on each pass (shuffle "
            "before batch), whose order in the interrupted epoch cannot be drawn again "
            "mid-epoch"
        )
    if kind == "dataset" and mid_epoch and noted is not None and not noted.steps():
        return (
            "the training data is a tf.data dataset of unknown length, lost in its first epoch "
            "before its length was known"
        )
    steps, length = (None, None) if noted is None else (noted.steps(), noted.data_steps)
    if arguments.get("steps_per_epoch") and steps and length and 0 < steps < length:
        # Keras reads one iterator over several epochs, made anew when a
        # pass is used up (cutting that epoch short): its place is the
        # framework's, not rebuilt here.
        return (
            f"read {steps} steps per epoch (steps_per_epoch) from data of {length} steps "
            "per pass, one iterator across epochs, whose place the survivors cannot rebuild"
        )
    validation = arguments.get("validation_data")
    kind = None if validation is None else fw.classify_validation(validation).kind
    if kind in _VALIDATION_CANNOT_GO_ON:
        return f"the validation data is {_CANNOT_GO_ON[kind]}"
    return None


def _batch_words(fw: Any, arguments: dict, size: int) -> str:
    """How the survivors' steps keep the global batch, for `_say`."""
    if _training_kind(fw, arguments) == "dataset":
        started = world.get().batch_ranks
        split = "into one batch" if size == 1 else f"and split by rows over the {size} ranks"
        return f"each step the same {started} batches of the dataset, joined {split}"
    global_batch = shard_plan.global_batch(arguments.get("batch_size"))
    share = global_batch // size
    return (
        f"the same global batch of {global_batch} ({share} per rank"
        f"{'' if global_batch % size == 0 else ', one more on some'})"
    )


def _say(loss: elastic.Loss, resume: Resume, batch: str) -> None:
    where = (
        f"from step {resume.step} of that epoch (the last step every rank completed)"
        if resume.logs is None
        else "from that epoch's validation and end (its steps were all done)"
    )
    log.info(
        f"lost {loss.where()} in epoch {resume.epoch + 1}; {loss.size} of {loss.size_before} "
        f"ranks go on {where}, with {batch}; recovered in {loss.seconds:.2f} s",
        once=False,
    )


def fit(
    fw: Any,
    model: Any,
    arguments: dict,
    run: Callable[[dict, Resume | None, Any], Any],
) -> Any:
    """`run(arguments, resume, position)` until it returns, going on after
    each lost rank (see the module's docstring). `arguments` are fit's
    (`calls.bind`), before sharding."""
    resume: Resume | None = None
    noted = None
    while True:
        noted = position(fw, resume, noted)
        try:
            return run(dict(arguments), resume, noted)
        except Exception as error:  # noqa: BLE001 - recover() re-raises what is not a loss
            loss = elastic.recover(error)
            history = keras_callback_state.snapshot_history(model)
            resume = _roll_back(fw, model, noted, history)
            if noted.data_steps == _INFINITE and noted.first is not None:
                # One iterator for the whole run (steps_per_epoch): every
                # step since its first epoch drew a batch of it.
                start, offset = noted.first
                resume = dataclasses.replace(resume, batches=offset + resume.iterations - start)
            if (reason := _why_not_go_on(fw, arguments, noted, resume)) is not None:
                elastic.leave(
                    f"lost {loss.where()}; {reason}: ending the job; {elastic.where_to_resume()}"
                    if world.get().is_root
                    else ""
                )
            _go_on_checkpointing(noted, resume)
            # The steps were traced for the old world (its size is a
            # constant in them: the divided loss, the summed target).
            model.train_function = model.test_function = model.predict_function = None
            # Keras 3 starts at a BackupAndRestore's epoch when one was
            # restored: the epoch to go on from is the agreed one.
            if getattr(model, "_initial_epoch", None) is not None:
                model._initial_epoch = None
            _say(loss, resume, _batch_words(fw, arguments, loss.size))

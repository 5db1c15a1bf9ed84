"""Callbacks the plugin adds to Keras `fit` / `evaluate` / `predict`, and
the rule for which user callbacks run on which rank.

```python
import keras
from transparent_dist import keras_callbacks
callbacks = keras_callbacks.for_this_rank([keras.callbacks.CSVLogger("log.csv")])
```

Callbacks that write files or print (checkpoints, CSV and TensorBoard logs,
progress bars) run on rank 0 only. `BackupAndRestore` runs everywhere, so
every rank restores from the backup, but only rank 0 writes or deletes it.
Callbacks that steer training (`EarlyStopping`, `ReduceLROnPlateau`,
`LearningRateScheduler`, user callbacks) run on every rank and decide alike,
because the logs they see are global.

Imported only once Keras is.
"""

from __future__ import annotations

import time
import weakref
from typing import Any

import keras
import numpy as np

from transparent_dist import broadcast, checkpoint, config, log, timeline, world
from transparent_dist.data._together import together
from transparent_dist.patches import common

_ROOT_ONLY = (
    keras.callbacks.ModelCheckpoint,
    keras.callbacks.CSVLogger,
    keras.callbacks.TensorBoard,
    keras.callbacks.RemoteMonitor,
    keras.callbacks.ProgbarLogger,
)


def _no_op(*args: Any, **kwargs: Any) -> None:
    return None


def for_this_rank(callbacks: Any, fitting: bool = False, extra: tuple = ()) -> Any:
    """The plugin's callbacks (`extra` among them) plus the user's callbacks
    that run here."""
    if isinstance(callbacks, keras.callbacks.CallbackList):
        return callbacks  # assembled by the caller (e.g. fit's own evaluate)
    is_root = world.get().is_root
    out: list[Any] = [SyncVariables(), *extra]
    if fitting:
        out.append(FitSummary())
    if fitting and config.SETTINGS.lr_scaling == "linear":
        out.append(LinearScalingWarmup(config.SETTINGS.warmup_epochs))
    for callback in callbacks or []:
        if not is_root and isinstance(callback, _ROOT_ONLY):
            continue
        if not is_root and isinstance(callback, keras.callbacks.BackupAndRestore):
            callback._save_model = _no_op
            callback.on_train_end = _no_op
        out.append(callback)
    if fitting:
        checkpointer = next((c for c in extra if isinstance(c, CheckpointAndResume)), None)
        out.append(AgreeToStop(checkpointer))
    return out


def _build(optimizer: Any, variables: list[Any]) -> None:
    # Built now rather than inside the first traced step, so that its state
    # is broadcast (or restored) like the weights.
    if not optimizer.built:
        optimizer.build(variables)


class SyncVariables(keras.callbacks.Callback):
    """Broadcasts rank 0's model and optimizer variables when training,
    evaluation or prediction begins (models and optimizers are often built
    lazily, by then they are), and rank 0's non-trainable variables
    (batch-norm statistics) at the end of each epoch."""

    def _sync_all(self) -> None:
        broadcast.model_and_optimizer(self.model, _build if self._training else None)

    _training = False

    def on_train_begin(self, logs: Any = None) -> None:
        self._training = True
        self._sync_all()

    def on_train_end(self, logs: Any = None) -> None:
        self._training = False

    def on_test_begin(self, logs: Any = None) -> None:
        from transparent_dist.patches import keras3

        if not keras3.fitting():
            self._sync_all()

    def on_predict_begin(self, logs: Any = None) -> None:
        self._sync_all()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        broadcast.variables(
            self.model.non_trainable_variables, what="non-trainable model variables"
        )


# Learning rate each optimizer had before it was first scaled.
_BASE_RATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class LinearScalingWarmup(keras.callbacks.Callback):
    """Linear learning-rate scaling by N with gradual warm-up (Goyal et al.,
    2017): the rate grows linearly from the script's rate to N times it over
    `warmup_epochs` epochs, counted in optimizer steps, then stays there."""

    def __init__(self, warmup_epochs: float) -> None:
        super().__init__()
        self.warmup_epochs = warmup_epochs
        self._active = False

    def on_train_begin(self, logs: Any = None) -> None:
        optimizer = self.model.optimizer
        rate = getattr(optimizer, "_learning_rate", None)
        if not isinstance(rate, keras.Variable):
            log.info(
                "TD_LR_SCALING=linear needs a constant learning rate; this "
                "optimizer has a schedule, which is left unscaled"
            )
            return
        if optimizer not in _BASE_RATES:
            _BASE_RATES[optimizer] = float(rate.numpy())
        self._active = True
        self._steps_per_epoch = self.params.get("steps") or 1
        self._set_rate()

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        if self._active:
            self._set_rate()

    def _set_rate(self) -> None:
        optimizer = self.model.optimizer
        size = world.get().size
        warmup_steps = self.warmup_epochs * self._steps_per_epoch
        done = (
            1.0 if warmup_steps <= 0 else min(1.0, int(optimizer.iterations.numpy()) / warmup_steps)
        )
        optimizer._learning_rate.assign(_BASE_RATES[optimizer] * (1 + (size - 1) * done))


# Callback attributes that carry training state worth resuming.
_CALLBACK_STATE = ("wait", "best", "stopped_epoch", "cooldown_counter", "best_epoch")


class CheckpointAndResume(keras.callbacks.Callback):
    """`TD_CHECKPOINT_DIR`: resumes from the latest checkpoint when training
    begins; writes one every `TD_CHECKPOINT_EVERY` steps or seconds; and on
    SIGTERM / SIGUSR1 makes all ranks agree at the next step boundary, has
    rank 0 write one, and exits every rank with status 75.

    The state saved is every model and optimizer variable (weights, optimizer
    slots, step counter, random-seed state), the epoch and step within it,
    and the counters of callbacks such as EarlyStopping."""

    def __init__(
        self,
        directory: str,
        every: str,
        keep: int,
        skip: Any,
        callbacks: list,
        state: Any = None,
        unit: tuple[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.directory, self.keep, self.skip = directory, keep, skip
        self.every_steps, self.every_seconds = checkpoint.parse_every(every)
        self.user_callbacks = callbacks
        self.state, self.unit = state, unit
        self.global_step, self.epoch, self.step, self._resume_step = 0, 0, 0, 0

    def _state_variables(self) -> list[Any]:
        return list(self.model.variables) + list(self.model.optimizer.variables)

    def on_train_begin(self, logs: Any = None) -> None:
        self._last_save = time.monotonic()
        state, self.state = self.state, None
        if state is None:
            return
        arrays, meta = state
        with together(f"resuming from {meta['path']}"):
            variables = self._state_variables()
            shapes = [tuple(v.shape) for v in variables]
            if [tuple(a.shape) for a in arrays] != shapes:
                raise ValueError(
                    f"the checkpoint {meta['path']} is not of this model: it holds "
                    f"{len(arrays)} arrays of shapes {[tuple(a.shape) for a in arrays][:4]}..., "
                    f"this model and optimizer have {len(variables)} variables of shapes "
                    f"{shapes[:4]}... (a checkpoint directory of another run?)"
                )
        for variable, value in zip(variables, arrays, strict=True):
            variable.assign(value)
        self.model._initial_epoch = meta["epoch"]
        skipped = int(self.skip.numpy()) if self.skip is not None else meta["step"]
        self.global_step, self._resume_step = meta["global_step"], skipped
        for index, saved in meta.get("callbacks", {}).items():
            callback = (
                self.user_callbacks[int(index)] if int(index) < len(self.user_callbacks) else None
            )
            if callback is not None and type(callback).__name__ == saved.pop("class", None):
                for name, value in saved.items():
                    setattr(callback, name, value)
        log.info(
            f"resumed from {meta['path']}: epoch {meta['epoch'] + 1}, after step {skipped}",
            once=False,
        )

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.epoch, self.step, self._resume_step = epoch, self._resume_step, 0

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.step += 1
        self.global_step += 1

    def wanted(self) -> int:
        """This rank's wish after a step: 1 a signal asked for a checkpoint
        and exit, 2 a timed checkpoint is due (the ranks OR them)."""
        flags = 1 if checkpoint.requested() else 0
        if (
            self.every_seconds
            and world.get().is_root
            and time.monotonic() - self._last_save >= self.every_seconds
        ):
            flags |= 2
        return flags

    def after_agreement(self, flags: int) -> None:
        """Acts on the flags every rank agreed on after a step."""
        if self.every_steps and self.global_step % self.every_steps == 0:
            flags |= 2
        if flags & 3:
            self._save()
        if flags & 1:
            log.info(
                f"checkpoint written to {checkpoint.path_for(self.directory, self.global_step)}; "
                f"exiting with status {checkpoint.PREEMPTED_STATUS} (run the same command "
                "again to resume)"
            )
            raise checkpoint.Preempted()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if self.skip is not None:
            self.skip.assign(0)

    def _callback_state(self) -> dict:
        state = {}
        for index, callback in enumerate(self.user_callbacks):
            values = {
                name: getattr(callback, name)
                for name in _CALLBACK_STATE
                if isinstance(getattr(callback, name, None), (int, float))
            }
            if values:
                state[str(index)] = {"class": type(callback).__name__, **values}
        return state

    def _save(self) -> None:
        epoch, step = self.epoch, self.step
        steps = self.params.get("steps")
        if steps and step >= steps:  # the epoch is complete: resume with the next
            epoch, step = epoch + 1, 0
        meta = {
            "epoch": epoch,
            "step": step,
            "global_step": self.global_step,
            "callbacks": self._callback_state(),
            **checkpoint.progress(step, self.unit, world.get().size),
        }
        w = world.get()
        if w.is_root:
            arrays = [np.asarray(v.numpy()) for v in self._state_variables()]
            checkpoint.save(self.directory, arrays, meta, self.keep)
        if w.comm is not None:
            w.comm.Barrier()  # no rank goes on (or exits) before the checkpoint exists
        self._last_save = time.monotonic()


AgreeToStop = common.stop_agreement(keras.callbacks.Callback)


class FitSummary(keras.callbacks.Callback):
    """One line from rank 0 when fit ends: global samples per second and the
    share of time spent exchanging gradients; writes the `TD_TIMELINE` file."""

    def on_train_begin(self, logs: Any = None) -> None:
        timeline.reset()
        self._start = time.perf_counter()
        self._steps = 0

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        timeline.add("step", self._step_start, time.perf_counter())
        self._steps += 1

    def on_train_end(self, logs: Any = None) -> None:
        elapsed = time.perf_counter() - self._start
        stats = timeline.stats()
        w = world.get()
        local = [stats.samples, stats.exchange_seconds, stats.exchange_bytes, stats.wait_seconds]
        totals = (
            local if w.size == 1 else [sum(v) for v in zip(*w.comm.allgather(local), strict=True)]
        )
        path = timeline.write()
        if self._steps == 0 or elapsed <= 0:
            return
        exchange = totals[1] / w.size
        log.info(
            f"fit: {totals[0] / elapsed:,.0f} samples/s on {w.size} ranks; gradient "
            f"exchange {exchange / elapsed:.1%} of the time ({1e3 * exchange / self._steps:.2f} "
            f"ms/step, {totals[2] / w.size / self._steps / 1e6:.1f} MB/step), waiting for "
            f"other ranks {totals[3] / w.size / elapsed:.1%}"
            + (f"; timeline in {path}" if path else ""),
            once=False,
        )

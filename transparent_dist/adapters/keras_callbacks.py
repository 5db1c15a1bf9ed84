"""Callbacks the plugin adds to `fit` / `evaluate` / `predict`, written
once for Keras 3 and tf_keras (each framework's classes are made over its
own `Callback` base by `for_framework`), and the rule for which user
callbacks run on which rank.

```python
import keras
from transparent_dist.adapters import keras3, keras_callbacks
made = keras_callbacks.for_framework(keras3.FRAMEWORK)
callbacks = made.for_this_rank([keras.callbacks.CSVLogger("log.csv")])
```

Callbacks that write files or print (checkpoints, CSV and TensorBoard logs,
progress bars) run on rank 0 only. `BackupAndRestore` runs everywhere, so
every rank restores from the backup, but only rank 0 writes or deletes it.
Callbacks that steer training (`EarlyStopping`, `ReduceLROnPlateau`,
`LearningRateScheduler`, user callbacks) run on every rank and decide alike,
because the logs they see are global.
"""

from __future__ import annotations

import functools
import time
import types
import weakref
from typing import Any

from transparent_dist.core import checkpoint, config, log, preemption, sequence, timeline, world
from transparent_dist.tf import broadcast

__all__ = [
    "AgreeToStop",
    "CheckpointAndResume",
    "FitSummary",
    "LinearScalingWarmup",
    "SyncVariables",
    "for_framework",
]


class SyncVariables:
    """Broadcasts rank 0's model and optimizer variables when training,
    evaluation or prediction begins (models and optimizers are often built
    lazily, by then they are), and rank 0's non-trainable variables
    (batch-norm statistics) at the end of each epoch."""

    framework: Any = None  # set by `for_framework`

    def _sync_all(self) -> None:
        build = self.framework.build_optimizer if self._training else None
        broadcast.model_and_optimizer(self.model, build)

    _training = False

    def on_train_begin(self, logs: Any = None) -> None:
        self._training = True
        self._sync_all()

    def on_train_end(self, logs: Any = None) -> None:
        self._training = False

    def on_test_begin(self, logs: Any = None) -> None:
        if not self.framework.fitting():
            self._sync_all()

    def on_predict_begin(self, logs: Any = None) -> None:
        self._sync_all()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        broadcast.variables(
            self.model.non_trainable_variables, what="non-trainable model variables"
        )


# Learning rate each optimizer had before it was first scaled.
_BASE_RATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class LinearScalingWarmup:
    """Linear learning-rate scaling by N with gradual warm-up (Goyal et al.,
    2017): the rate grows linearly from the script's rate to N times it over
    `warmup_epochs` epochs, counted in optimizer steps, then stays there."""

    framework: Any = None

    def __init__(self, warmup_epochs: float) -> None:
        super().__init__()
        self.warmup_epochs = warmup_epochs
        self._active = False

    def on_train_begin(self, logs: Any = None) -> None:
        optimizer = self.model.optimizer
        rate = self.framework.learning_rate(optimizer)
        if rate is None:
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
        rate = self.framework.learning_rate(optimizer)
        rate.assign(_BASE_RATES[optimizer] * (1 + (size - 1) * done))


# Callback attributes that carry training state worth resuming.
_CALLBACK_STATE = ("wait", "best", "stopped_epoch", "cooldown_counter", "best_epoch")


class CheckpointAndResume:
    """`TD_CHECKPOINT_DIR` in `fit`: the Keras face of `preemption.Service`.
    Resumes from the checkpoint the service chose when training begins;
    after each step (once the ranks agreed, `AgreeToStop`) lets the service
    write one when due or asked for by a signal, and exit.

    The state saved is every model and optimizer variable (weights, optimizer
    slots, step counter, random-seed state), the epoch and step within it,
    the data consumed, and the counters of callbacks such as EarlyStopping."""

    framework: Any = None

    def __init__(
        self,
        service: preemption.Service,
        skip: Any,
        callbacks: list,
        state: Any = None,
        unit: tuple[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.service, self.skip = service, skip
        self.user_callbacks = callbacks
        self.state, self.unit = state, unit
        self.epoch, self.step, self._resume_step = 0, 0, 0

    def _state_variables(self) -> list[Any]:
        return list(self.model.variables) + broadcast.optimizer_variables(self.model.optimizer)

    def on_train_begin(self, logs: Any = None) -> None:
        state, self.state = self.state, None
        if state is None:
            return
        arrays, meta = state
        self.framework.build_optimizer(self.model.optimizer, self.model.trainable_variables)
        variables = self._state_variables()
        preemption.check_shapes(arrays, variables, meta["path"])
        for variable, value in zip(variables, arrays, strict=True):
            variable.assign(value)
        skipped = int(self.skip.numpy()) if self.skip is not None else meta["step"]
        self._resume_step = skipped
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
        self.service.global_step += 1

    def wanted(self) -> int:
        return self.service.wanted()

    def after_agreement(self, flags: int) -> None:
        self.service.after_agreement(flags, self._snapshot)

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

    def _snapshot(self) -> tuple[list[Any] | None, dict]:
        epoch, step = self.epoch, self.step
        steps = self.params.get("steps")
        if steps and step >= steps:  # the epoch is complete: resume with the next
            epoch, step = epoch + 1, 0
        meta = {
            "epoch": epoch,
            "step": step,
            "callbacks": self._callback_state(),
            **checkpoint.progress(step, self.unit, world.get().size),
        }
        arrays = preemption.values(self._state_variables()) if world.get().is_root else None
        return arrays, meta


class AgreeToStop:
    """Runs last in fit: after each step and epoch the ranks agree whether
    to stop (and, with a `checkpointer`, whether to write a checkpoint)."""

    def __init__(self, checkpointer: Any = None) -> None:
        super().__init__()
        self.checkpointer = checkpointer

    def _agree(self, where: str) -> int:
        wanted = self.checkpointer.wanted() if self.checkpointer is not None else 0
        flags = sequence.agree_to_stop(bool(self.model.stop_training), wanted, where)
        if flags & sequence.STOP:
            self.model.stop_training = True
        return flags

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        flags = self._agree(f"step {batch + 1}")
        if self.checkpointer is not None:
            self.checkpointer.after_agreement(flags)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self._agree(f"the end of epoch {epoch + 1}")


class FitSummary:
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


# ------------------------------------------------------------ one set per framework

_MIXINS = (SyncVariables, LinearScalingWarmup, CheckpointAndResume, AgreeToStop, FitSummary)


@functools.cache
def for_framework(framework: Any) -> types.SimpleNamespace:
    """The plugin's callback classes over `framework.callback_base`, and
    `for_this_rank` for that framework."""
    made = {
        mixin.__name__: type(
            mixin.__name__, (mixin, framework.callback_base), {"framework": framework}
        )
        for mixin in _MIXINS
    }
    ns = types.SimpleNamespace(**made)

    def for_this_rank(callbacks: Any, fitting: bool = False, extra: tuple = ()) -> Any:
        """The plugin's callbacks (`extra` among them) plus the user's
        callbacks that run on this rank."""
        if isinstance(callbacks, framework.callback_list):
            return callbacks  # assembled by the caller (e.g. fit's own evaluate)
        is_root = world.get().is_root
        out: list[Any] = [ns.SyncVariables(), *extra]
        if fitting:
            out.append(ns.FitSummary())
        if fitting and config.SETTINGS.lr_scaling == "linear":
            out.append(ns.LinearScalingWarmup(config.SETTINGS.warmup_epochs))
        for callback in callbacks or []:
            if not is_root and isinstance(callback, framework.root_only_callbacks):
                continue
            if not is_root and isinstance(callback, framework.backup_and_restore):
                framework.silence_backup(callback)
            out.append(callback)
        if fitting:
            checkpointer = next((c for c in extra if isinstance(c, ns.CheckpointAndResume)), None)
            out.append(ns.AgreeToStop(checkpointer))
        return out

    ns.for_this_rank = for_this_rank
    return ns

"""Callbacks the plugin adds to `fit` / `evaluate` / `predict`, written
once for Keras 3 and tf_keras (each framework's classes are made over its
own `Callback` base by `for_framework`), and the rule for which user
callbacks run on which rank.

```python
import keras
from transparent_dist.adapters import keras3_tensorflow, keras_callbacks
made = keras_callbacks.for_framework(keras3_tensorflow.FRAMEWORK)
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

import numpy as np
import tensorflow as tf

from transparent_dist.adapters import fit_start, keras_callback_state
from transparent_dist.core import (
    checkpoint,
    collectives,
    config,
    log,
    phases,
    preemption,
    timeline,
    timeline_file,
    unique,
    world,
)
from transparent_dist.tf import broadcast

__all__ = [
    "AgreeToStop",
    "CheckpointAndResume",
    "FitStart",
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


class CheckpointAndResume:
    """`TD_CHECKPOINT_DIR` in `fit`: the Keras face of `preemption.Service`.

    Resumes from the checkpoint the service chose once every callback's own
    `on_train_begin` has run (`restore`, called by `AgreeToStop`): their
    resets come first, the saved state after. After each step the ranks
    agree (`AgreeToStop`) whether a checkpoint is due or asked for by a
    signal; it is written at the next boundary, where the state is whole:
    the next step's start (mid-epoch), the next epoch's start (after the
    epoch's validation and callbacks), or the end of training (then marked
    `stopped` if a callback stopped it, so that the resume trains no more).

    The state saved is every model and optimizer variable (weights, optimizer
    slots and learning rate, step counter, random-seed state), the epoch and
    step within it, the data consumed, and the state of Keras's callbacks
    (`keras_callback_state`)."""

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
        # Flags agreed after a step, acted on at the next boundary.
        self._pending = 0
        # Saved epochs of model.history, restored once its on_train_begin ran.
        self._history: dict | None = None
        # A mid-epoch resume: the state again after the epoch's on_epoch_begin
        # (which ran before the checkpoint, and must not act twice).
        self._again: tuple[list, list] | None = None
        self._watch: Any = None
        # A mid-epoch resume: the epoch's metric states before the checkpoint.
        self._metric_sums: list | None = None
        self._unsaved: set[str] = set()

    def _state_variables(self) -> list[Any]:
        optimizer = self.model.optimizer
        # tf_keras's learning rate is a variable outside its optimizer's list.
        rate = self.framework.learning_rate(optimizer)
        return unique.by_identity(
            [
                *self.model.variables,
                *broadcast.optimizer_variables(optimizer),
                *([] if rate is None else [rate]),
            ]
        )

    def _metric_variables(self) -> list[Any]:
        return broadcast.metric_variables(self.model.metrics)

    def on_train_begin(self, logs: Any = None) -> None:
        if self.state is not None:
            keras_callback_state.prepare(self.user_callbacks, self.state[1])

    def restore(self) -> None:
        """The checkpoint's state back, after every callback's `on_train_begin`."""
        state, self.state = self.state, None
        if state is not None:
            self._restore(*state)
        self._watch = keras_callback_state.Watch(self.user_callbacks)

    def _restore(self, arrays: list, meta: dict) -> None:
        self.framework.build_optimizer(self.model.optimizer, self.model.trainable_variables)
        variables = self._state_variables()
        count = meta.get("state_arrays", len(arrays))
        preemption.check_shapes(arrays[:count], variables, meta["path"])
        for variable, value in zip(variables, arrays[:count], strict=True):
            variable.assign(value)
        keras_callback_state.restore(self.user_callbacks, meta, arrays)
        self._history = meta.get("history")
        if getattr(self.model, "_initial_epoch", None) is not None:
            # Keras 3's BackupAndRestore set the first epoch from its own
            # backup, which may be older: the checkpoint's weights are the
            # ones restored, so its epoch is the one to go on from.
            self.model._initial_epoch = meta["epoch"]
        skipped = int(self.skip.numpy()) if self.skip is not None else meta["step"]
        self._resume_step = skipped
        if skipped:
            self._again = (variables, arrays[:count])
            sums = arrays[count : count + meta.get("metric_arrays", 0)]
            # The ranks' states add up to what the logs show: rank 0 adds it all.
            self._metric_sums = sums if world.get().is_root else [np.zeros_like(a) for a in sums]
        self._unsaved = set(meta.get("unsaved", []))
        if self._unsaved:
            log.info(
                "the state of callback(s) "
                + "; ".join(sorted(self._unsaved))
                + " changed during training and is not in the checkpoint (the plugin saves "
                "Keras's own callbacks only): they start afresh in the resumed run, which "
                "may then differ from an uninterrupted one"
            )
        where = (
            f"training had stopped after epoch {meta['stopped_at']}; nothing is left to train"
            if meta.get("stopped")
            else f"epoch {meta['epoch'] + 1}, after step {skipped}"
        )
        log.info(f"resumed from {meta['path']}: {where}", once=False)

    def after_epoch_begin(self) -> None:
        """After every callback's `on_epoch_begin` of a mid-epoch resume:
        what they changed (a LearningRateScheduler's rate) is set back to
        the checkpoint's, as in the uninterrupted run they ran once."""
        again, self._again = self._again, None
        if again is not None:
            for variable, value in zip(*again, strict=True):
                variable.assign(value)

    def _restore_history(self) -> None:
        saved, self._history = self._history, None
        if saved is not None:
            keras_callback_state.restore_history(self.model, saved)

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._restore_history()
        if self._pending:  # agreed at the end of the last epoch: it is complete now
            self.epoch, self.step = epoch, 0
            self._act()
        self.epoch, self.step, self._resume_step = epoch, self._resume_step, 0

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        if self._pending:
            self._act()

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.step += 1
        self.service.global_step += 1
        sums, self._metric_sums = self._metric_sums, None
        if sums is not None:
            self._add_metric_sums(sums)

    def _add_metric_sums(self, sums: list) -> None:
        """After the resumed epoch's first step: its metrics go on from the
        steps done before the checkpoint (the epoch's logged loss is the
        whole epoch's, as uninterrupted). Added now, not set at the epoch's
        start: tf_keras builds its metrics in the first step."""
        variables = self._metric_variables()
        if [tuple(v.shape) for v in variables] != [tuple(a.shape) for a in sums]:
            log.debug("the metrics' states do not fit the checkpoint's: counted from the resume")
            return
        for variable, value in zip(variables, sums, strict=True):
            variable.assign_add(value)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if self.skip is not None:
            self.skip.assign(0)

    def on_train_end(self, logs: Any = None) -> None:
        self._restore_history()
        if self._pending:
            self.epoch, self.step = self.epoch + 1, 0
            self._act(stopped=bool(self.model.stop_training))

    def wanted(self) -> int:
        return self.service.wanted()

    def after_agreement(self, flags: int) -> None:
        """The flags the ranks agreed on after a step or an epoch: a
        checkpoint due or asked for is written at the next boundary."""
        self._pending |= self.service.due(flags) & (phases.Wish.EXIT | phases.Wish.DUE)

    def _act(self, stopped: bool = False) -> None:
        flags, self._pending = self._pending, 0
        self.service.act(flags, lambda: self._snapshot(stopped))

    def _snapshot(self, stopped: bool = False) -> tuple[list[Any] | None, dict]:
        is_root = world.get().is_root
        variables = self._state_variables()
        # Every rank takes part in the sum, rank 0 writes it.
        metrics = [
            np.asarray(t)
            for t in self.framework.backend.sum(
                [tf.convert_to_tensor(v) for v in self._metric_variables()]
            )
        ]
        first = len(variables) + len(metrics)
        callbacks, extra = keras_callback_state.snapshot(self.user_callbacks, first)
        if self._watch is not None:
            self._unsaved |= set(self._watch.changed())
        meta = {
            "epoch": self.epoch,
            "step": self.step,
            "stopped": stopped,
            "state_arrays": len(variables),
            "metric_arrays": len(metrics),
            "callbacks": callbacks,
            "history": keras_callback_state.snapshot_history(self.model),
            "unsaved": sorted(self._unsaved),
            **checkpoint.progress(self.step, self.unit, world.get().size),
        }
        arrays = preemption.values(variables) + metrics + extra if is_root else None
        return arrays, meta


class AgreeToStop:
    """Runs last in fit: after each step and epoch the ranks agree whether
    to stop (and, with a `checkpointer`, whether to write a checkpoint); it
    is also where the checkpointer restores, after the other callbacks'
    `on_train_begin` and `on_epoch_begin`."""

    def __init__(self, checkpointer: Any = None) -> None:
        super().__init__()
        self.checkpointer = checkpointer

    def on_train_begin(self, logs: Any = None) -> None:
        if self.checkpointer is not None:
            self.checkpointer.restore()

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        if self.checkpointer is not None:
            self.checkpointer.after_epoch_begin()

    def _agree(self, where: str) -> int:
        wanted = self.checkpointer.wanted() if self.checkpointer is not None else 0
        flags = phases.agree_to_stop(bool(self.model.stop_training), wanted, where)
        if flags & phases.Wish.STOP:
            self.model.stop_training = True
        if self.checkpointer is not None:
            self.checkpointer.after_agreement(flags)
        return flags

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self._agree(f"step {batch + 1}")

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self._agree(f"the end of epoch {epoch + 1}")


class FitStart:
    """One line from rank 0 when a fit of more than one rank starts: the
    ranks, the per-rank and global batch, and the steps per epoch, which
    Keras knows by now (`fit_start`)."""

    def __init__(self, data: Any, batch_size: int | None) -> None:
        super().__init__()
        self.batch = fit_start.describe(data, batch_size)

    def on_train_begin(self, logs: Any = None) -> None:
        fit_start.say(self.batch, (getattr(self, "params", None) or {}).get("steps"))


class FitSummary:
    """One line from rank 0 when fit ends: global samples per second and the
    share of time spent exchanging gradients; writes the `TD_TIMELINE` file.
    A build of the native op inside this fit (its first exchange) is left
    out of the time: it happens once per machine image, not per epoch."""

    def on_train_begin(self, logs: Any = None) -> None:
        timeline.restart_counters()
        self._start = time.perf_counter()
        self._steps = 0

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        self._step_start = time.perf_counter()
        self._first_step = batch

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        timeline.add("step", self._step_start, time.perf_counter())
        # With steps_per_execution = k Keras calls these once per k steps,
        # `batch` being the first step at the beginning and the last at the
        # end (past the epoch's end in its last call): count steps, not calls.
        epoch_steps = (getattr(self, "params", None) or {}).get("steps")
        last = min(batch, epoch_steps - 1) if epoch_steps else batch
        self._steps += max(1, last - self._first_step + 1)

    def on_train_end(self, logs: Any = None) -> None:
        elapsed = time.perf_counter() - self._start
        stats = timeline.stats()
        w = world.get()
        local = [
            stats.samples,
            stats.exchange_seconds,
            stats.exchange_bytes,
            stats.wait_seconds,
            stats.builds,
        ]
        everyone = collectives.allgather_object(local, w.comm)
        totals = [sum(v) for v in zip(*everyone, strict=True)]
        path = timeline_file.write()
        # A rank that did not compile waited for the one that did: any build
        # in the job makes this rank's time in it the build's.
        build = stats.build_seconds if totals[4] else 0.0
        elapsed -= build
        if self._steps == 0 or elapsed <= 0 or totals[0] == 0:
            # No step exchanged (the last rank left after a loss trains
            # alone): no rate to give.
            return
        exchange = totals[1] / w.size
        log.info(
            f"fit: {totals[0] / elapsed:,.0f} samples/s on {w.size} ranks"
            + (f" (excluding the {build:.1f} s op build)" if build else "")
            + "; gradient "
            f"exchange {exchange / elapsed:.1%} of the time ({1e3 * exchange / self._steps:.2f} "
            f"ms/step, {totals[2] / w.size / self._steps / 1e6:.1f} MB/step), waiting for "
            f"other ranks {totals[3] / w.size / elapsed:.1%}"
            + (f"; timeline in {path}" if path else ""),
            once=False,
        )


class ExchangeReady:
    """Makes the gradient exchange ready when a fit begins, on every rank
    (`Backend.prepare`; TensorFlow's `exchange.prepare`: the native op's
    load is a collective, and may compile it), outside the first step's
    trace. It runs after `FitSummary` started its clock, which leaves a
    build out of the rate."""

    framework: Any = None  # set by `for_framework`

    def on_train_begin(self, logs: Any = None) -> None:
        self.framework.backend.prepare()


# ------------------------------------------------------------ one set per framework

_MIXINS = (
    SyncVariables,
    LinearScalingWarmup,
    CheckpointAndResume,
    AgreeToStop,
    FitStart,
    FitSummary,
    ExchangeReady,
)


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
            out += [ns.FitSummary(), ns.ExchangeReady()]
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

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

import weakref
from typing import Any

import keras

from transparent_dist import broadcast, config, log, world

_ROOT_ONLY = (
    keras.callbacks.ModelCheckpoint,
    keras.callbacks.CSVLogger,
    keras.callbacks.TensorBoard,
    keras.callbacks.RemoteMonitor,
    keras.callbacks.ProgbarLogger,
)


def _no_op(*args: Any, **kwargs: Any) -> None:
    return None


def for_this_rank(callbacks: Any, fitting: bool = False) -> Any:
    """The plugin's callbacks plus the user's callbacks that run here."""
    if isinstance(callbacks, keras.callbacks.CallbackList):
        return callbacks  # assembled by the caller (e.g. fit's own evaluate)
    is_root = world.get().is_root
    out: list[Any] = [SyncVariables()]
    if fitting and config.SETTINGS.lr_scaling == "linear":
        out.append(LinearScalingWarmup(config.SETTINGS.warmup_epochs))
    for callback in callbacks or []:
        if not is_root and isinstance(callback, _ROOT_ONLY):
            continue
        if not is_root and isinstance(callback, keras.callbacks.BackupAndRestore):
            callback._save_model = _no_op
            callback.on_train_end = _no_op
        out.append(callback)
    return out


class SyncVariables(keras.callbacks.Callback):
    """Broadcasts rank 0's model and optimizer variables when training,
    evaluation or prediction begins (models and optimizers are often built
    lazily, by then they are), and rank 0's non-trainable variables
    (batch-norm statistics) at the end of each epoch."""

    def _sync_all(self) -> None:
        model = self.model
        targets = list(model.variables)
        optimizer = getattr(model, "optimizer", None)
        if optimizer is not None and optimizer.built:
            targets += list(optimizer.variables)
        broadcast.variables(targets, what="model and optimizer variables")
        if optimizer is not None and optimizer.built:
            broadcast.mark_synced(optimizer)

    def on_train_begin(self, logs: Any = None) -> None:
        self._sync_all()

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

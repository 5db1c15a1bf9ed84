"""The state of Keras's own callbacks in a checkpoint, so that a resumed
`fit` stops, lowers its learning rate, keeps its best weights and writes
its files as the uninterrupted one would.

```python
meta["callbacks"], extra = keras_callback_state.snapshot(callbacks, first_array)
keras_callback_state.restore(callbacks, meta, arrays)   # after their on_train_begin
```

Each callback resets its counters in its own `on_train_begin`, so the
plugin restores them after every callback's `on_train_begin` has run
(`CheckpointAndResume.restore`, called by `AgreeToStop`, which runs last).
What is saved, per class (Keras 3 and tf_keras name these alike):

- EarlyStopping: `wait`, `stopped_epoch`, `best`, `best_epoch`, and
  `best_weights` (as arrays of the checkpoint);
- ReduceLROnPlateau: `wait`, `cooldown_counter`, `best` (the rate itself is
  an optimizer variable, saved with the others);
- ModelCheckpoint: `best` and its batch counters;
- BackupAndRestore (Keras 3): its epoch and batch counters;
- CSVLogger: the file's length and hash at the checkpoint: on resume, rows
  written after it (by a run that went on and was killed) are cut off, and
  the file is appended to, not rewritten;
- History (`model.history`): every epoch's logs.

LearningRateScheduler and TerminateOnNaN hold no state of their own (on a
mid-epoch resume the scheduler's second `on_epoch_begin` is undone:
`CheckpointAndResume.after_epoch_begin`).
Any other callback whose attributes changed during training holds state the
plugin cannot save: `Watch` finds them, and the resume says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from typing import Any

import numpy as np

from transparent_dist.core import log, world

__all__ = [
    "Watch",
    "kind",
    "prepare",
    "restore",
    "restore_history",
    "snapshot",
    "snapshot_history",
]

_ATTRIBUTES = {
    "EarlyStopping": ("wait", "stopped_epoch", "best", "best_epoch"),
    "ReduceLROnPlateau": ("wait", "cooldown_counter", "best"),
    "ModelCheckpoint": (
        "best",
        "_current_epoch",
        "_batches_seen_since_last_saving",
        "_last_batch_seen",
    ),
    "BackupAndRestore": ("_current_epoch", "_batches_seen_since_last_saving", "_last_batch_seen"),
    "CSVLogger": (),
    "LearningRateScheduler": (),
    "TerminateOnNaN": (),
    "ProgbarLogger": (),
    "History": (),  # model.history, restored apart (`restore_history`)
}
_ARRAYS = {"EarlyStopping": ("best_weights",)}


def kind(callback: Any) -> str | None:
    """The Keras callback class `callback` is (or derives from) whose state
    the plugin knows, or None."""
    for cls in type(callback).__mro__:
        if cls.__name__ in _ATTRIBUTES and cls.__module__.split(".")[0] in ("keras", "tf_keras"):
            return cls.__name__
    return None


def _plain(value: Any) -> Any:
    """`value` as JSON values (numpy scalars as numbers); raises TypeError
    for anything else."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    raise TypeError(type(value).__name__)


def _digest(path: str, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(size))
    return digest.hexdigest()


def _csv_file(callback: Any) -> dict | None:
    """The length and hash of a CSVLogger's file as written so far."""
    path = getattr(callback, "filename", None)
    csv_file = getattr(callback, "csv_file", None)
    if not path or csv_file is None:
        return None  # not run on this rank (CSVLogger writes on rank 0)
    try:
        csv_file.flush()  # Keras 3's is a file, tf_keras's a GFile
    except (OSError, ValueError):
        pass  # closed: all it wrote is in the file
    try:
        size = os.path.getsize(path)
        return {"path": os.path.abspath(path), "size": size, "sha256": _digest(path, size)}
    except OSError:
        return None


def snapshot(callbacks: list, first_array: int) -> tuple[dict, list[np.ndarray]]:
    """The saved state of `callbacks` (by position) and the arrays it adds
    to the checkpoint, numbered from `first_array`."""
    saved: dict[str, dict] = {}
    extra: list[np.ndarray] = []
    for index, callback in enumerate(callbacks):
        name = kind(callback)
        if name is None:
            continue
        entry: dict[str, Any] = {"class": name}
        for attribute in _ATTRIBUTES[name]:
            if hasattr(callback, attribute):
                try:
                    entry[attribute] = _plain(getattr(callback, attribute))
                except TypeError:
                    continue
        for attribute in _ARRAYS.get(name, ()):
            value = getattr(callback, attribute, None)
            if value is not None:
                entry.setdefault("arrays", {})[attribute] = [first_array + len(extra), len(value)]
                extra += [np.asarray(a) for a in value]
        if name == "CSVLogger" and (written := _csv_file(callback)) is not None:
            entry["file"] = written
        saved[str(index)] = entry
    return saved, extra


def snapshot_history(model: Any) -> dict | None:
    """`model.history`'s epochs and logs."""
    history = getattr(model, "history", None)
    if history is None or not hasattr(history, "history"):
        return None
    try:
        return {"history": _plain(history.history), "epoch": _plain(getattr(history, "epoch", []))}
    except TypeError:
        return None


def _matching(callbacks: list, index: str, entry: dict, say: bool = True) -> Any:
    """The callback at `index` if it is of the class saved there."""
    callback = callbacks[int(index)] if int(index) < len(callbacks) else None
    if callback is None or kind(callback) != entry["class"]:
        if not say:
            return None
        log.info(
            f"the checkpoint holds the state of a {entry['class']} as callback {int(index) + 1}, "
            f"which this fit does not have there ({type(callback).__name__ if callback else 'none'}): "
            "that state is not restored",
            once=False,
        )
        return None
    return callback


# CSVLogger -> its own `append`, while `prepare` has it append on resume
# (until `restore`).
_APPEND: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def prepare(callbacks: list, meta: dict) -> None:
    """Before the callbacks' own `on_train_begin` on resume: each
    CSVLogger's file back to its length at the checkpoint, appended to."""
    for index, entry in meta.get("callbacks", {}).items():
        if entry["class"] != "CSVLogger":
            continue
        callback = _matching(callbacks, index, entry, say=False)
        if callback is None:
            continue
        _APPEND[callback] = callback.append
        callback.append = True  # the rows of the epochs done are in the file already
        if "file" in entry and world.get().is_root:  # where CSVLogger writes
            _cut_back(callback.filename, entry["file"])


def _cut_back(path: str, written: dict) -> None:
    size = int(written["size"])
    try:
        now = os.path.getsize(path)
        same = now >= size and _digest(path, size) == written["sha256"]
    except OSError:
        now, same = -1, False
    if now == size and same:
        return
    if not same:
        log.info(
            f"CSVLogger's file {path} is not the one written up to the checkpoint "
            f"({size} bytes then, {max(now, 0)} now, other contents): appended to as it is",
            once=False,
        )
        return
    os.truncate(path, size)
    log.info(
        f"CSVLogger's file {path}: the {now - size} bytes written after the checkpoint are "
        "cut off (the resumed epochs write them again)",
        once=False,
    )


def restore(callbacks: list, meta: dict, arrays: list[np.ndarray]) -> None:
    """After the callbacks' own `on_train_begin`: their saved state back."""
    for index, entry in meta.get("callbacks", {}).items():
        callback = _matching(callbacks, index, entry)
        if callback is None:
            continue
        for attribute, value in entry.items():
            if attribute in _ATTRIBUTES[entry["class"]]:
                setattr(callback, attribute, value)
        for attribute, (start, count) in entry.get("arrays", {}).items():
            setattr(callback, attribute, list(arrays[start : start + count]))
        if callback in _APPEND:
            callback.append = _APPEND.pop(callback)


def restore_history(model: Any, saved: dict | None) -> None:
    """`model.history` back to the epochs before the checkpoint, once its
    own `on_train_begin` has emptied it."""
    history = getattr(model, "history", None)
    if saved is None or history is None or not hasattr(history, "history"):
        return
    history.history = {k: list(v) for k, v in saved["history"].items()}
    history.epoch = list(saved["epoch"])


# Callback attributes that are wiring, not training state.
_WIRING = frozenset({"model", "_model", "params", "validation_data", "_chief_worker_only"})


def _summary(value: Any) -> str | None:
    """A fingerprint of a value that may be training state (numbers,
    strings, containers of them, arrays); None for other objects."""
    if isinstance(value, np.ndarray):
        return hashlib.sha256(value.tobytes()).hexdigest() + str(value.shape)
    try:
        return json.dumps(_plain(value), sort_keys=True)
    except (TypeError, ValueError):
        return None


class Watch:
    """Finds callbacks whose state the plugin cannot save: those of no
    class it knows whose attributes (numbers, strings, lists, arrays)
    change while training."""

    def __init__(self, callbacks: list) -> None:
        self.callbacks = [c for c in callbacks if kind(c) is None]
        self._before = [self._look(c) for c in self.callbacks]

    @staticmethod
    def _look(callback: Any) -> dict[str, str | None]:
        return {
            name: _summary(value) for name, value in vars(callback).items() if name not in _WIRING
        }

    def changed(self) -> list[str]:
        """'Class (attribute, ...)' for each callback whose state changed."""
        found = []
        for callback, before in zip(self.callbacks, self._before, strict=True):
            now = self._look(callback)
            names = sorted(
                n for n, v in now.items() if v is not None and (n not in before or before[n] != v)
            )
            if names:
                found.append(f"{type(callback).__name__} ({', '.join(names)})")
        return found

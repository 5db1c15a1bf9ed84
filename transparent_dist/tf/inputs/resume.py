"""A dataset resumed mid-epoch: its first batches skipped in the resumed
epoch only, and the lengths of its epochs known, so the framework's epoch
loop stops exactly where a run without the interruption would have.

```python
import tensorflow as tf
from transparent_dist.tf.inputs import resume
ds = tf.data.Dataset.range(10).batch(2)
resumed, skip = resume.skip_first(ds, lambda: 3)   # the resumed epoch: batches 3, 4
resume.epoch_lengths(resumed)              # (2, 5)
skip.assign(0)                             # the epochs after it: whole
```
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

__all__ = ["endless", "epoch_lengths", "num_batches", "skip_first"]

# A resumed dataset (`skip_first`) -> (its resumed epoch's length, a full
# epoch's length).
_EPOCH_LENGTHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# The resumed datasets that never end (read `steps_per_epoch` at a time).
_ENDLESS: weakref.WeakSet = weakref.WeakSet()


def epoch_lengths(dataset: Any) -> tuple[int, int] | None:
    """(resumed epoch, full epoch) lengths of a dataset `skip_first` made,
    for the frameworks' exact epoch loop after a resume; None for any other."""
    return None if dataset is None else _EPOCH_LENGTHS.get(dataset)


def endless(dataset: Any) -> bool:
    """Whether `dataset` is a resumed dataset that never ends: the framework
    reads one iterator of it across epochs, `steps_per_epoch` at a time."""
    return dataset is not None and dataset in _ENDLESS


def skip_first(
    dataset: Any, steps: Callable[[], int], epoch_steps: tuple[int, int] | None = None
) -> tuple[Any, Any] | None:
    """`(dataset less its first `steps()` batches, the skip counter)` where
    `dataset` is a `tf.data.Dataset`, else None (and `steps` is not called:
    it may say what it rounds). The counter is read afresh
    at every epoch's iterator: the resumed epoch skips what it had done,
    and once it is set to 0 the epochs after it are whole. `epoch_steps`:
    the resumed epoch's and a full epoch's steps of a dataset that never
    ends (`steps_per_epoch`; its `steps()` counts every batch read since
    its iterator was made, over epochs) or whose length is unknown."""
    import tensorflow as tf

    if not isinstance(dataset, tf.data.Dataset):
        return None
    skip = tf.Variable(steps(), dtype=tf.int64, trainable=False)
    resumed = tf.data.Dataset.range(1).flat_map(
        tf.autograph.experimental.do_not_convert(lambda _: dataset.skip(skip))
    )
    full = int(dataset.cardinality())
    if epoch_steps is not None and full < 0:  # endless, or of unknown length
        _EPOCH_LENGTHS[resumed] = epoch_steps
        if full == tf.data.INFINITE_CARDINALITY:
            _ENDLESS.add(resumed)
    elif full > 0:
        _EPOCH_LENGTHS[resumed] = (full - int(skip.numpy()), full)
    return resumed, skip


def num_batches(dataset: Any) -> int | None:
    """The batches in one pass of a `tf.data.Dataset` (-1: endless), or
    None when it is not one or its length is unknown."""
    import tensorflow as tf

    if not isinstance(dataset, tf.data.Dataset):
        return None
    length = int(dataset.cardinality())
    return None if length == tf.data.UNKNOWN_CARDINALITY else length

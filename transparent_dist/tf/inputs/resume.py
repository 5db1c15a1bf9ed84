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

__all__ = ["epoch_lengths", "skip_first"]

# A resumed dataset (`skip_first`) -> (its resumed epoch's length, a full
# epoch's length).
_EPOCH_LENGTHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def epoch_lengths(dataset: Any) -> tuple[int, int] | None:
    """(resumed epoch, full epoch) lengths of a dataset `skip_first` made,
    for the frameworks' exact epoch loop after a resume; None for any other."""
    return None if dataset is None else _EPOCH_LENGTHS.get(dataset)


def skip_first(dataset: Any, steps: Callable[[], int]) -> tuple[Any, Any] | None:
    """`(dataset less its first `steps()` batches, the skip counter)` where
    `dataset` is a `tf.data.Dataset`, else None (and `steps` is not called:
    it may say what it rounds). The counter is read afresh
    at every epoch's iterator: the resumed epoch skips what it had done,
    and once it is set to 0 the epochs after it are whole."""
    import tensorflow as tf

    if not isinstance(dataset, tf.data.Dataset):
        return None
    skip = tf.Variable(steps(), dtype=tf.int64, trainable=False)
    resumed = tf.data.Dataset.range(1).flat_map(
        tf.autograph.experimental.do_not_convert(lambda _: dataset.skip(skip))
    )
    full = int(dataset.cardinality())
    if full > 0:
        _EPOCH_LENGTHS[resumed] = (full - int(skip.numpy()), full)
    return resumed, skip

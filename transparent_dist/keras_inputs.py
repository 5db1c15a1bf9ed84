"""The Keras 3 half of sharding the data given to `fit`, `evaluate`,
`predict`: what kind of data it is, Keras's own global batch order for
arrays, and `keras.utils.PyDataset`s. The framework-neutral `tf.data` half
is `tf_inputs`.

```python
from transparent_dist import keras_inputs
indices = keras_inputs.global_batch_indices(500, global_batch=96, shuffle=False)
```

A PyDataset is split round-robin by batch (rank r takes batches r, r+N,
...) for training, and in contiguous runs of batches for `predict`.

Imported only once Keras and TensorFlow are.
"""

from __future__ import annotations

import math
import types
from typing import Any

import numpy as np
import tensorflow as tf
from keras.src import tree
from keras.src.trainers.data_adapters import data_adapter_utils
from keras.src.trainers.data_adapters.array_data_adapter import (
    ArrayDataAdapter,
    can_convert_arrays,
)
from keras.src.trainers.data_adapters.py_dataset_adapter import PyDataset

from transparent_dist import collectives, sharding, tf_inputs, world
from transparent_dist.tf_inputs import InputError, is_file_backed


def global_batch_indices(num_samples: int, global_batch: int, shuffle: Any) -> tf.data.Dataset:
    """Global batches of sample indices in the order plain Keras 3 takes
    them: Keras's own adapter over 0..n-1 (so, for a given TF seed, the same
    shuffle permutation as plain `fit`)."""
    return ArrayDataAdapter(
        np.arange(num_samples, dtype=np.int64), batch_size=global_batch, shuffle=shuffle
    ).get_tf_dataset()


def kind_of(x: Any) -> str:
    """'file', 'dataset', 'pydataset', 'generator', 'arrays' or 'other'."""
    if x is not None and not isinstance(x, (tf.data.Dataset, PyDataset)) and is_file_backed(x):
        return "file"
    if isinstance(x, tf.data.Dataset):
        return "dataset"
    if isinstance(x, PyDataset):
        return "pydataset"
    if isinstance(x, types.GeneratorType) or (
        hasattr(x, "__next__") and hasattr(x, "__iter__") and not hasattr(x, "shape")
    ):
        return "generator"
    if x is not None and can_convert_arrays(x):
        return "arrays"
    return "other"


# ---------------------------------------------------------------- arrays


def pack_arrays(x: Any, y: Any = None, sample_weight: Any = None) -> tuple[Any, int]:
    """`(inputs, num_samples)` of array data, checked like Keras checks it."""
    inputs = tree.lists_to_tuples(data_adapter_utils.pack_x_y_sample_weight(x, y, sample_weight))
    data_adapter_utils.check_data_cardinality(inputs)
    leaves = [a for a in tree.flatten(inputs) if a is not None]
    return inputs, int(leaves[0].shape[0])


# ---------------------------------------------------------------- files


# ---------------------------------------------------------------- datasets


# ---------------------------------------------------------------- PyDataset


class _PyDatasetPart(PyDataset):
    """Rank `rank`'s batches of a PyDataset: round-robin (`contiguous=False`,
    training) or one contiguous run (`contiguous=True`, predict)."""

    def __init__(self, inner: PyDataset, rank: int, size: int, contiguous: bool) -> None:
        super().__init__(
            workers=inner.workers,
            use_multiprocessing=inner.use_multiprocessing,
            max_queue_size=inner.max_queue_size,
        )
        self.inner, self.rank, self.size = inner, rank, size
        total = inner.num_batches
        self._total = total
        self._start = None
        if total is None:
            self._len = None
        elif contiguous:
            self._start, stop = sharding.shard_range(total, rank, size)
            self._len = stop - self._start
        else:
            self._len = math.ceil(total / size)

    @property
    def num_batches(self) -> int | None:
        return self._len

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> Any:
        if self._start is not None:
            return self.inner[self._start + index]
        if self._total is None:
            return self.inner[index * self.size + self.rank]
        full, extra = divmod(self._total, self.size)
        if index < full - (1 if extra else 0):
            return self.inner[index * self.size + self.rank]
        return self._last_step(index - (full - 1))

    def _last_step(self, which: int) -> Any:
        """Step `which` (0: the last full round, 1: the tail) of the epoch's
        end (`tf_inputs.epoch_end`)."""
        full = self._total // self.size
        tail = [self.inner[j] for j in range(full * self.size, self._total)]
        own = last = None
        if full:
            base = (full - 1) * self.size
            own = self.inner[base + self.rank]
            last = own if self.rank == self.size - 1 else self.inner[base + self.size - 1]
        steps = tf_inputs.epoch_end(own, last, tail, self.rank, self.size, "the PyDataset")
        return steps[which if full else 0]

    def on_epoch_begin(self) -> None:
        self.inner.on_epoch_begin()

    def on_epoch_end(self) -> None:
        self.inner.on_epoch_end()


def pydataset_part(dataset: PyDataset, rank: int, size: int, contiguous: bool = False) -> PyDataset:
    collectives.check_agreement(
        "the number of batches of the PyDataset", dataset.num_batches, world.get().comm
    )
    if dataset.num_batches == 0:
        raise InputError("transparent_dist: the PyDataset is empty")
    return _PyDatasetPart(dataset, rank, size, contiguous)


# ---------------------------------------------------------------- generators

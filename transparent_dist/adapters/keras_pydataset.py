"""Keras 3's `PyDataset` split between the ranks: round-robin by batch
(rank r takes batches r, r+N, ...) for training, the last partial round
split by rows; a contiguous run of batches for `predict` (all of it on
every rank when it has fewer batches than ranks, or an unknown number).

```python
import keras
from transparent_dist.adapters import keras_pydataset
from transparent_dist.core.shard_plan import ShardPlan
class Squares(keras.utils.PyDataset):
    def __len__(self): return 5
    def __getitem__(self, i): return [[i * i]], [[i]]
mine = keras_pydataset.part(Squares(), ShardPlan(rank=0, size=1))
```
"""

from __future__ import annotations

import math
from typing import Any

import keras

from transparent_dist.core import collectives, sharding, world
from transparent_dist.core.errors import CollectiveError
from transparent_dist.core.shard_plan import ShardPlan
from transparent_dist.tf.inputs import pipelines

__all__ = ["part"]


class _PyDatasetPart(keras.utils.PyDataset):
    """Rank `rank`'s batches of a PyDataset: round-robin (`contiguous=False`,
    training) or one contiguous run (`contiguous=True`, predict)."""

    def __init__(self, inner: Any, rank: int, size: int, contiguous: bool) -> None:
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
        steps = pipelines.epoch_end(own, last, tail, self.rank, self.size, "the PyDataset")
        return steps[which if full else 0]

    def on_epoch_begin(self) -> None:
        self.inner.on_epoch_begin()

    def on_epoch_end(self) -> None:
        self.inner.on_epoch_end()


def part(dataset: Any, plan: ShardPlan, contiguous: bool = False) -> Any:
    """Rank `plan.rank`'s part of a `keras.utils.PyDataset`: round-robin by
    batch for training, a contiguous run of batches for `predict`, or, for
    `predict` of fewer batches than ranks (or an unknown number), the
    dataset itself: every rank predicts all of it."""
    total = dataset.num_batches
    collectives.check_agreement("the number of batches of the PyDataset", total, world.get().comm)
    if total == 0:
        raise CollectiveError("transparent_dist: the PyDataset is empty")
    if contiguous and (total is None or total < plan.size):
        return dataset
    return _PyDatasetPart(dataset, plan.rank, plan.size, contiguous)

"""The line rank 0 prints when a `fit` of more than one rank starts: the
ranks, the per-rank and the global batch, the steps per epoch.

```python
from transparent_dist.adapters import fit_start
batch = fit_start.describe(data, batch_size=256)   # in fit, before sharding
fit_start.say(batch, steps=59)                     # on_train_begin: Keras knows the steps
# transparent_dist: fit: 2 ranks x 256 samples per rank = global batch 512
#   (TD_BATCH_SIZE=per_rank), 59 steps per epoch. For one process's global
#   batch (256), set TD_BATCH_SIZE=global
```

A script's `batch_size` is per rank by default, so N ranks train at N
times the batch one process trains at, and end at another loss: this line
is where a user learns that, and (once per job) how to keep one process's
global batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transparent_dist.core import config, log, world
from transparent_dist.core.shard_plan import DEFAULT_BATCH_SIZE
from transparent_dist.tf import inputs as tf_inputs

__all__ = ["Batch", "describe", "line", "reset", "say"]

# Kinds whose batches the plugin makes from rows (TD_BATCH_SIZE applies).
_ROWS = ("arrays", "file", "rank rows")
_STREAMS = {"dataset": "the dataset", "sequence": "the sequence", "generator": "the generator"}
# Datasets that pass their input's batches on unchanged in size (walked to
# find a `.batch(b)`); anything else stops the walk.
_SAME_BATCHES = (
    "_PrefetchDataset",
    "_MapDataset",
    "_ParallelMapDataset",
    "_ShuffleDataset",
    "_RepeatDataset",
    "_CacheDataset",
    "_TakeDataset",
    "_SkipDataset",
    "_OptionsDataset",
    "_FilterDataset",
    "_AssertCardinalityDataset",
    "_IgnoreErrorsDataset",
)
_BATCHING = ("_BatchDataset", "_PaddedBatchDataset", "_ParallelBatchDataset")


@dataclasses.dataclass(frozen=True)
class Batch:
    """How one fit's training batches are made.

    Attributes:
        size: the number of ranks.
        kind: the data's kind (`tf.inputs.Data.kind`).
        script: the batch the script asked for (rows), or its stream's batch
            size when known; None if unknown.
        global_batch: samples per step over all ranks; None if unknown.
        per_rank: samples per rank per step ("256", "33-34"); "" if unknown.
        setting: TD_BATCH_SIZE where it applies (rows), else None.
    """

    size: int
    kind: str
    script: int | None
    global_batch: int | None
    per_rank: str
    setting: str | None


def _dataset_batch(dataset: Any) -> int | None:
    """The batch size of a `.batch(b)` dataset, when it can be told without
    reading it: a static first dimension, or the `batch` under a chain of
    datasets that keep batch sizes (best effort; None otherwise)."""
    try:
        import tensorflow as tf

        first = tf.nest.flatten(dataset.element_spec)[0]
        if first.shape.rank and first.shape[0] is not None:
            return int(first.shape[0])
        node = dataset
        for _ in range(32):
            name = type(node).__name__
            if name in _BATCHING:
                return int(node._batch_size.numpy())
            if name not in _SAME_BATCHES:
                return None
            node = node._input_dataset
    except Exception:  # noqa: BLE001 - only a figure in a message depends on it
        return None
    return None


def _stream_batch(data: Any) -> int | None:
    if data.kind == "dataset":
        return _dataset_batch(data.x)
    if data.kind == "sequence":
        value = getattr(data.x, "batch_size", None)
        return value if isinstance(value, int) and value > 0 else None
    return None


def _split(total: int, size: int) -> str:
    low = total // size
    return str(low) if total % size == 0 else f"{low}-{low + 1}"


def describe(data: Any, batch_size: int | None) -> Batch:
    """The batches of a fit of `data` (classified, as the script passed it)
    with the script's `batch_size`, on this world."""
    size = world.get().size
    if data.kind in _ROWS:
        total = tf_inputs.global_batch(batch_size, size)
        per_rank = _split(total, size)
        if data.kind == "rank rows":  # each rank cuts its own rows: about that many
            total, per_rank = max(1, total // size) * size, f"~{max(1, total // size)}"
        script = batch_size or DEFAULT_BATCH_SIZE
        return Batch(size, data.kind, script, total, per_rank, config.SETTINGS.batch_size)
    if data.kind in _STREAMS:
        b = _stream_batch(data)
        return Batch(size, data.kind, b, None if b is None else b * size, "", None)
    return Batch(size, data.kind, batch_size, None, "", None)


def _steps(steps: int | None) -> str:
    if not steps:
        return "steps per epoch unknown"
    return f"{steps} step{'' if steps == 1 else 's'} per epoch"


def line(batch: Batch, steps: int | None) -> str:
    """The start line for `batch` and Keras's `steps` per epoch (None:
    unknown), without the hint."""
    n, every = batch.size, _steps(steps)
    if batch.kind in _ROWS:
        if batch.setting == "global":
            return (
                f"fit: global batch {batch.global_batch} (TD_BATCH_SIZE=global) = {n} ranks x "
                f"{batch.per_rank} samples per rank, {every}"
            )
        return (
            f"fit: {n} ranks x {batch.per_rank} samples per rank = global batch "
            f"{batch.global_batch} (TD_BATCH_SIZE={batch.setting}), {every}"
        )
    if batch.kind in _STREAMS:
        what = _STREAMS[batch.kind]
        if batch.script is None:
            return (
                f"fit: {n} ranks x 1 batch of {what} per rank = global batch of {n} of its "
                f"batches, {every}"
            )
        return (
            f"fit: {n} ranks x 1 batch of {what} ({batch.script} samples) per rank = global "
            f"batch {batch.global_batch}, {every}"
        )
    return f"fit: {n} ranks, each training on all of its data (not split), {every}"


def _hint(batch: Batch) -> str:
    """How to train at one process's global batch, where it differs."""
    if batch.kind in _ROWS and batch.setting != "global":
        return f". For one process's global batch ({batch.script}), set TD_BATCH_SIZE=global"
    if batch.kind in _STREAMS:
        return (
            f". For one process's global batch, batch {_STREAMS[batch.kind]} {batch.size} "
            "times smaller"
        )
    return ""


_SAID: set[str] = set()
_HINTED: dict[str, bool] = {"done": False}


def reset() -> None:
    """Forgets the lines said and the hint given (`activation.reset`)."""
    _SAID.clear()
    _HINTED["done"] = False


def say(batch: Batch, steps: int | None) -> None:
    """Prints the start line on rank 0 when the job has more than one rank:
    once per distinct line (a loop of `fit(epochs=1)` calls says it once),
    with the hint on the first one only."""
    if batch.size == 1:
        return
    text = line(batch, steps)
    if text in _SAID:
        return
    _SAID.add(text)
    hint = _hint(batch)
    if hint and not _HINTED["done"]:
        _HINTED["done"] = True
        text += hint
    log.info(text, once=False)

"""`ShardPlan`: how one call's data is split over the ranks (arithmetic
only: the pipelines that follow it are a backend's, `tf.inputs`).

```python
from transparent_dist.core.shard_plan import ShardPlan
plan = ShardPlan(rank=1, size=4, global_batch=128, seed=7, shuffle=True)
plan.local_batch   # 32
```
"""

from __future__ import annotations

import dataclasses

from transparent_dist.core import config, world

__all__ = ["DEFAULT_BATCH_SIZE", "ShardPlan", "global_batch"]

DEFAULT_BATCH_SIZE = 32  # Keras's own default


def global_batch(batch_size: int | None, size: int | None = None) -> int:
    """The global batch for a `batch_size` argument: N times it, or itself
    with TD_BATCH_SIZE=global. N is the ranks the job started with
    (`World.batch_ranks`): after a lost rank the survivors keep the global
    batch."""
    b = batch_size or DEFAULT_BATCH_SIZE
    if config.SETTINGS.batch_size == "global":
        return b
    return b * (world.get().batch_ranks if size is None else size)


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """This rank's place, the global batch, and the seed every rank draws
    the same orders from; one per `fit` / `evaluate` / `predict` input,
    passed to every pipeline (`tf.inputs.pipelines`).

    Args:
        rank, size: this rank and the number of ranks.
        global_batch: samples per step over all ranks.
        seed: the seed agreed by the ranks (`tf.inputs.seeds.agreed_seed`).
        shuffle: whether each epoch draws a new order.
        batch_ranks: the ranks the job started with (`World.batch_ranks`;
            0: `size`). A source the script batched itself gives each of
            them one of its batches per step; after a lost rank the
            survivors keep that step (`round_size`).
    """

    rank: int = 0
    size: int = 1
    global_batch: int = DEFAULT_BATCH_SIZE
    seed: int = 0
    shuffle: bool = False
    batch_ranks: int = 0

    @property
    def local_batch(self) -> int:
        return max(1, self.global_batch // self.size)

    def whole(self) -> ShardPlan:
        """The plan of one process taking all of the data itself, in this
        plan's local batches (a call every rank makes on all of it)."""
        return dataclasses.replace(
            self, rank=0, size=1, global_batch=self.local_batch, batch_ranks=0
        )

    @property
    def round_size(self) -> int:
        """The script's batches one step takes over all ranks: one per rank
        the job started with, so a step is the same samples after a loss."""
        return self.batch_ranks or self.size

    @classmethod
    def for_call(cls, batch_size: int | None, shuffle: object, seed: int) -> ShardPlan:
        """The plan of this rank for a call with `batch_size` (per rank, as
        the script wrote it) and `shuffle`."""
        w = world.get()
        return cls(
            w.rank,
            w.size,
            global_batch(batch_size, w.batch_ranks),
            seed,
            bool(shuffle),
            w.batch_ranks,
        )

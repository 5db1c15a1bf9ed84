"""Which part of the data belongs to which rank: the arithmetic only.

```python
from transparent_dist.sharding import shard_range
shard_range(1000, rank=1, size=3)   # (334, 667)
```

Blocks are contiguous, in rank order, cover `0..n` exactly once, and differ
in length by at most one: the first `n % size` ranks get one item more.
The same rule splits a global batch between the ranks (`batch_block`), so
the union of the ranks' k-th local batches is the k-th global batch.
"""

from __future__ import annotations

import math


def shard_range(n: int, rank: int | None = None, size: int | None = None) -> tuple[int, int]:
    """`(start, stop)` of rank `rank`'s contiguous block of `n` items.

    `rank` and `size` default to this process's place in the MPI world.
    """
    if rank is None or size is None:
        from transparent_dist import world

        w = world.get()
        rank = w.rank if rank is None else rank
        size = w.size if size is None else size
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"rank {rank} is not in a world of size {size}")
    if n < 0:
        raise ValueError(f"cannot shard a negative number of items ({n})")
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def round_robin_count(n: int, rank: int, size: int) -> int:
    """How many of items `rank, rank + size, ...` exist below `n`."""
    return len(range(rank, n, size))


def steps_for(n: int, global_batch: int) -> int:
    """Number of global batches (the last may be short) for `n` samples."""
    return math.ceil(n / global_batch)

"""Which part of the data belongs to which rank: the arithmetic only.

```python
from transparent_dist.core.sharding import shard_range
shard_range(1000, rank=1, size=3)   # (334, 667)
```

Blocks are contiguous, in rank order, cover `0..n` exactly once, and differ
in length by at most one: the first `n % size` ranks get one item more.
The same rule splits a global batch between the ranks (`batch_block`), so
the union of the ranks' k-th local batches is the k-th global batch.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "RankRows",
    "TooFewSamples",
    "global_batch_sizes",
    "holds_rank_rows",
    "last_steps",
    "rank_rows",
    "shard_range",
    "steps_for",
]


def shard_range(n: int, rank: int | None = None, size: int | None = None) -> tuple[int, int]:
    """`(start, stop)` of rank `rank`'s contiguous block of `n` items.

    `rank` and `size` default to this process's place in the MPI world.
    """
    if rank is None or size is None:
        from transparent_dist.core import world

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


def steps_for(n: int, global_batch: int) -> int:
    """Number of global batches (the last may be short) for `n` samples."""
    return math.ceil(n / global_batch)


# A piece of a batch: (index of the batch, first row, row after the last).
Piece = tuple[int, int, int]


class TooFewSamples(ValueError):
    """The data cannot give every rank at least one sample in a step."""


def _tail_groups(sizes: list[int], size: int) -> list[int]:
    """How many ranks share each batch of the last, partial round: at least
    one each (none for an empty batch), at most one per row, about in
    proportion to the rows; `size` in all."""
    total = sum(sizes)
    groups = [min(s, max(1, size * s // total)) if s else 0 for s in sizes]
    while sum(groups) > size:
        j = max((g, j) for j, g in enumerate(groups) if g > 1)[1]
        groups[j] -= 1
    while sum(groups) < size:
        j = max(
            (s / g, j) for j, (s, g) in enumerate(zip(sizes, groups, strict=True)) if 0 < g < s
        )[1]
        groups[j] += 1
    return groups


def last_steps(previous: list[int] | None, tail: list[int], rank: int, size: int) -> list[Piece]:
    """This rank's pieces for the last steps of an epoch of batches dealt
    round-robin (rank r takes batch r of every round of `size` batches).

    `previous` holds the row counts of the last full round (None if there
    is none), `tail` those of the batches after it (fewer than `size`).
    Batch indices count from the first batch of `previous` (or of `tail`).

    - The last full round: batch `rank`, whole.
    - The tail is one more global step, split by rows so that every rank
      gets at least one: the ranks are grouped per batch (in rank order)
      and each group splits its batch (`shard_range`). A piece never spans
      two batches, so batches of different shapes (padded text) work. With
      sample-weighted gradient averaging the step equals one process
      taking the tail's rows as one batch.
    - If the tail has fewer rows than ranks, the last rows of the previous
      round's last batch move to the tail step (one row per rank there),
      keeping the number of steps: the two steps then differ from one
      process's last two.
    """
    pieces: list[Piece] = []
    first = 0
    if previous is not None:
        first = size
        pieces.append((rank, 0, previous[rank]))
    total = sum(tail)
    if total == 0:
        return pieces
    if total >= size:
        groups = _tail_groups(tail, size)
        start = 0
        for j, g in enumerate(groups):
            if start <= rank < start + g:
                a, b = shard_range(tail[j], rank - start, g)
                return pieces + [(first + j, a, b)]
            start += g
    missing = size - total
    if previous is None or previous[-1] <= missing:
        raise TooFewSamples(
            f"the last {total} sample(s) of the epoch cannot be spread over {size} ranks"
        )
    last = size - 1
    keep = previous[-1] - missing
    if rank == last:
        pieces[0] = (last, 0, keep)
    rows = [(last, keep + k) for k in range(missing)]
    rows += [(first + j, r) for j, s in enumerate(tail) for r in range(s)]
    index, row = rows[rank]
    return pieces + [(index, row, row + 1)]


def global_batch_sizes(n: int, global_batch: int, size: int) -> list[int]:
    """The global batch sizes of an epoch of `n` in-memory samples: `global_batch`
    each, the last one short; if that one has fewer samples than ranks, it
    takes the missing ones from the batch before it (so every rank gets at
    least one sample in every step); when the batch before it cannot spare
    them (fewer than two samples per rank left in the two), the two become
    one step."""
    sizes = [global_batch] * (n // global_batch)
    if n % global_batch:
        sizes.append(n % global_batch)
    if len(sizes) > 1 and sizes[-1] < size:
        missing = size - sizes[-1]
        if sizes[-2] - missing >= size:
            sizes[-2] -= missing
            sizes[-1] = size
        else:
            last = sizes.pop()
            sizes[-1] += last
    return sizes


class RankRows(np.ndarray):
    """An array holding this rank's rows only, as the readers of
    `transparent_dist.data` return them. `fit`, `evaluate` and `predict`
    use such data as it is, without splitting it again. Slices, arithmetic
    and `astype` keep the mark (`x = read_hdf5(...) / 255.0` is still this
    rank's rows); `np.asarray` drops it."""


def rank_rows(array: Any) -> RankRows:
    """`array` marked as this rank's rows (a view, no copy)."""
    return np.asarray(array).view(RankRows)


def holds_rank_rows(*structures: Any) -> bool:
    """Whether any array in `structures` (nested lists, tuples, dicts) is
    marked as this rank's rows."""
    stack = list(structures)
    while stack:
        item = stack.pop()
        if isinstance(item, RankRows):
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return False

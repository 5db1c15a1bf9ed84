"""This rank's contiguous block of rows of an array on disk, for the
readers of HDF5 and NetCDF files alike.

```python
from transparent_dist.data import blocks, hdf5
rows = blocks.read_rank_block("data.h5", "x", hdf5.open_file, hdf5.dataset_of)
```
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from transparent_dist.core import collectives, world
from transparent_dist.core.collectives import together
from transparent_dist.core.errors import CollectiveError
from transparent_dist.core.sharding import rank_rows, shard_range
from transparent_dist.data import missing

__all__ = ["check_rows", "read_rank_block"]


def check_rows(n: int, what: str) -> None:
    """The same error on every rank unless `what` has a row for each rank."""
    size = world.get().size
    if n == 0:
        raise CollectiveError(f"transparent_dist: {what} is empty")
    if n < size:
        raise CollectiveError(
            f"transparent_dist: {what} has {n} rows, fewer than the {size} ranks of this job"
        )


def _no_fills(item: Any) -> Sequence[tuple[str, Any]]:
    return ()


def read_rank_block(
    path: str,
    name: str,
    open_file: Callable[[str], Any],
    item_of: Callable[[Any, str, str], Any],
    allow_nan: bool | None = None,
    kind: str = "array",
    fills_of: Callable[[Any], Sequence[tuple[str, Any]]] = _no_fills,
) -> np.ndarray:
    """This rank's block (`shard_range`) of the array `name` in the file at
    `path`, opened with `open_file(path)` and found with `item_of(file,
    name, path)`; any rank's failure is every rank's error.

    A missing value (NaN, a masked entry, one equal to `fills_of(item)`) is
    an error naming the file, the `kind` ("dataset", "variable") and the
    row, unless allowed (`missing.allowed(allow_nan)`): then it is NaN, and
    an integer array becomes float64 on every rank if one rank had one.
    """
    allow = missing.allowed(allow_nan)
    with together(f"reading {name!r} from {path}"):
        with open_file(path) as f:
            item = item_of(f, name, path)
            check_rows(item.shape[0], f"{path}:{name}")
            start, stop = shard_range(item.shape[0])
            block = item[start:stop]
            fills = fills_of(item)
        values, mask = np.ma.getdata(block), np.ma.getmask(block)
        found = missing.first(values, mask, fills)
        if found is not None and not allow:
            local, reason = found
            index = [start + local[0], *local[1:]]  # in the whole array, not this block
            element = f" (element {index})" if len(index) > 1 else ""
            raise CollectiveError(
                f"transparent_dist: {path}: {kind} {name!r}, row {index[0]}{element}: "
                f"missing value ({reason}); {missing.HINT}"
            )
    if allow and values.dtype.kind in "iub":
        # NaN needs a float: one dtype on every rank, even where this
        # rank's rows are whole.
        w = world.get()
        anywhere = any(collectives.allgather_object(found is not None, w.comm))
        if anywhere:
            return rank_rows(missing.to_nan(values, mask, fills))
    elif found is not None:
        return rank_rows(missing.to_nan(values, mask, fills))
    return rank_rows(values)

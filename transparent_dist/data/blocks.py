"""This rank's contiguous block of rows of an array on disk, for the
readers of HDF5 and NetCDF files alike.

```python
from transparent_dist.data import blocks, hdf5
rows = blocks.read_rank_block("data.h5", "x", hdf5.open_file, hdf5.dataset_of)
```
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from transparent_dist.core import world
from transparent_dist.core.errors import CollectiveError, together
from transparent_dist.core.sharding import rank_rows, shard_range

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


def read_rank_block(
    path: str, name: str, open_file: Callable[[str], Any], item_of: Callable[[Any, str, str], Any]
) -> np.ndarray:
    """This rank's block (`shard_range`) of the array `name` in the file at
    `path`, opened with `open_file(path)` and found with `item_of(file,
    name, path)`; any rank's failure is every rank's error."""
    with together(f"reading {name!r} from {path}"):
        with open_file(path) as f:
            item = item_of(f, name, path)
            check_rows(item.shape[0], f"{path}:{name}")
            start, stop = shard_range(item.shape[0])
            return rank_rows(item[start:stop])

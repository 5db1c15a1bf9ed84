"""Scientific data files sharded by rank: each rank reads only its part.

```python
from transparent_dist.data import DataSet, read_csv, read_hdf5, read_netcdf, shard_range
x = read_hdf5("train.h5", "x")            # this rank's rows
x, y = read_csv("train.csv", label="y")   # this rank's byte range, parsed
t = read_netcdf("era5.nc", "t2m")         # this rank's records
ds = DataSet("train.h5", data="x", labels="y", validation_split=0.1)
for xb, yb in ds.batches(64, shuffle=True, seed=0, epoch=0):
    ...
```

Every reader returns this rank's rows in file order; the ranks' results in
rank order make up the whole. Bad input (missing file, dataset, variable or
column, bad rows, missing values, too few rows for the ranks) raises the
same `DataError` on every rank, so none is left waiting in a collective.
Missing values (an empty or `NA` cell, NaN, a masked or `_FillValue` entry)
are let through as NaN only when asked: `allow_nan=True`, or
`TD_ALLOW_NAN=1` for every reader.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from transparent_dist.core import collectives, world
from transparent_dist.core.collectives import together
from transparent_dist.core.errors import CollectiveError as DataError
from transparent_dist.core.sharding import shard_range
from transparent_dist.data.csv import read_csv
from transparent_dist.data.hdf5 import read_hdf5
from transparent_dist.data.netcdf import read_netcdf

__all__ = ["DataError", "DataSet", "read_csv", "read_hdf5", "read_netcdf", "shard_range"]

_FORMATS = {
    ".h5": "hdf5",
    ".hdf5": "hdf5",
    ".hdf": "hdf5",
    ".he5": "hdf5",
    ".nc": "netcdf",
    ".nc4": "netcdf",
    ".cdf": "netcdf",
    ".csv": "csv",
    ".txt": "csv",
}


class DataSet:
    """This rank's shard of a file's data and labels, MaTEx style, for TF1
    sessions and custom loops.

    ```python
    ds = DataSet("train.h5", data="x", labels="y", validation_split=0.1)
    ds.training_data.shape      # this rank's training rows
    ```

    `data` and `labels` name HDF5 datasets or NetCDF variables; for CSV,
    `labels` is the label column and `data` the feature columns (default:
    all others). `validation_split` takes the last fraction of each rank's
    block for validation. `allow_nan` is the readers' (missing values as
    NaN rather than an error).
    """

    def __init__(
        self,
        path: str,
        data: str | Sequence[str] | None = None,
        labels: str | None = None,
        validation_split: float = 0.0,
        format: str | None = None,
        allow_nan: bool | None = None,
    ) -> None:
        self.path = path
        kind = format or _FORMATS.get(os.path.splitext(path)[1].lower())
        if kind is None:
            raise ValueError(
                f"transparent_dist: cannot tell the format of {path}; pass format="
                "'hdf5', 'netcdf' or 'csv'"
            )
        if not 0.0 <= validation_split < 1.0:
            raise ValueError("transparent_dist: validation_split must be in [0, 1)")
        if kind == "csv":
            result = read_csv(path, label=labels, columns=data, allow_nan=allow_nan)
            x, y = result if labels is not None else (result, None)
        else:
            if data is None:
                raise ValueError(f"transparent_dist: name the {kind} variable with data=")
            read = read_hdf5 if kind == "hdf5" else read_netcdf
            x = read(path, data, allow_nan)
            y = read(path, labels, allow_nan) if labels is not None else None
        with together(f"reading {path}"):
            if y is not None and len(y) != len(x):
                raise DataError(
                    f"transparent_dist: {path}: data and labels differ in length "
                    f"({data!r} vs {labels!r})"
                )
        cut = len(x) - int(round(len(x) * validation_split))
        self.training_data, self.validation_data = x[:cut], x[cut:]
        self.training_labels = None if y is None else y[:cut]
        self.validation_labels = None if y is None else y[cut:]
        w = world.get()
        counts = collectives.allgather_object(cut, w.comm)
        self.num_training = sum(counts)
        self._max_local = max(counts)

    def steps(self, batch_size: int) -> int:
        """Batches per epoch: the same on every rank."""
        return math.ceil(self._max_local / batch_size)

    def batches(
        self, batch_size: int, shuffle: bool = False, seed: int = 0, epoch: int = 0
    ) -> Iterator[Any]:
        """This rank's training batches for one epoch: `(x, y)` (or `x`).

        Every rank yields `steps(batch_size)` batches; a rank whose block is
        one row shorter repeats its first row in the last batch rather than
        yield an empty one (a TF1 loss over no rows would be NaN).
        """
        n = len(self.training_data)
        order = (
            np.random.default_rng([seed, epoch, world.get().rank]).permutation(n)
            if shuffle
            else np.arange(n)
        )
        for step in range(self.steps(batch_size)):
            index = order[step * batch_size : (step + 1) * batch_size]
            if len(index) == 0:
                index = order[:1]
            x = self.training_data[index]
            yield x if self.training_labels is None else (x, self.training_labels[index])

"""This rank's rows of an HDF5 dataset, read as one hyperslab.

```python
from transparent_dist.data import read_hdf5
x = read_hdf5("train.h5", "images")   # rows shard_range(len) of /images
```
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from transparent_dist.core import world
from transparent_dist.core.errors import CollectiveError
from transparent_dist.data import blocks, missing

__all__ = ["dataset_of", "fills_of", "open_file", "read_hdf5"]


def open_file(path: str) -> Any:
    """Opens `path` read-only; with the MPI-IO driver when h5py was built
    with it and the job has several ranks (a collective open)."""
    import h5py

    if not os.path.exists(path):
        raise FileNotFoundError(2, "No such file", path)
    w = world.get()
    if w.size > 1 and h5py.get_config().mpi:
        return h5py.File(path, "r", driver="mpio", comm=w.comm)
    return h5py.File(path, "r")


def dataset_of(file: Any, name: str, path: str) -> Any:
    """The dataset `name` of an open file, or a KeyError saying what there is."""
    import h5py

    item = file.get(name)
    if not isinstance(item, h5py.Dataset):
        names: list[str] = []
        file.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        raise KeyError(
            f"{path} has no dataset {name!r}; its datasets: {', '.join(names) or 'none'}"
        )
    if item.ndim == 0:
        raise CollectiveError(f"transparent_dist: {path}:{name} is a scalar; rows are needed")
    return item


def fills_of(dataset: Any) -> list[tuple[str, Any]]:
    """The values the dataset's CF attributes (`_FillValue`, `missing_value`)
    declare missing: a NetCDF-4 file read as HDF5 has them."""
    return missing.fill_attributes(dataset.attrs)


def read_hdf5(path: str, dataset: str, allow_nan: bool | None = None) -> np.ndarray:
    """This rank's contiguous block of rows (first axis) of `dataset`.

    Contiguous, chunked and compressed datasets alike: only the chunks that
    hold this rank's rows are read. Concatenating the ranks' results in rank
    order gives the whole dataset.

    A missing value (NaN, or a value the dataset's `_FillValue` /
    `missing_value` attribute names) on any rank is an error naming the
    dataset and row, unless `allow_nan` (default: the `TD_ALLOW_NAN`
    setting) lets it through as NaN.
    """
    return blocks.read_rank_block(
        path, dataset, open_file, dataset_of, allow_nan, kind="dataset", fills_of=fills_of
    )

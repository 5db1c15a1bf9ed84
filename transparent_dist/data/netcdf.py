"""This rank's records of a NetCDF variable.

```python
from transparent_dist.data import read_netcdf
t = read_netcdf("climate.nc", "temperature")   # records shard_range(len)
```
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from transparent_dist.core import world
from transparent_dist.data import blocks

__all__ = ["open_file", "read_netcdf", "variable_of"]


def open_file(path: str) -> Any:
    """Opens `path` read-only; in parallel (MPI-IO or PnetCDF) when the
    netCDF4 library was built with it and the job has several ranks."""
    import netCDF4

    if not os.path.exists(path):
        raise FileNotFoundError(2, "No such file", path)
    w = world.get()
    parallel = netCDF4.__has_parallel4_support__ or netCDF4.__has_pnetcdf_support__
    if w.size > 1 and parallel:
        # No `info`: netCDF4 passes MPI_INFO_NULL then.
        return netCDF4.Dataset(path, "r", parallel=True, comm=w.comm)
    return netCDF4.Dataset(path, "r")


def variable_of(file: Any, name: str, path: str) -> Any:
    variable = file.variables.get(name)
    if variable is None:
        raise KeyError(
            f"{path} has no variable {name!r}; its variables: {', '.join(file.variables) or 'none'}"
        )
    if variable.ndim == 0:
        raise ValueError(f"{path}:{name} is a scalar; records are needed")
    # Masked arrays, always: a fill value, missing_value or out-of-range
    # entry is then found by its mask, never passed on as a number.
    variable.set_auto_mask(True)
    variable.set_always_mask(True)
    return variable


def read_netcdf(path: str, variable: str, allow_nan: bool | None = None) -> np.ndarray:
    """This rank's contiguous block of records (first dimension, usually the
    unlimited one) of `variable`.

    A missing value (an entry netCDF4 masks: `_FillValue`, `missing_value`,
    outside `valid_range`, a record never written; or NaN) on any rank is
    an error naming the variable and record, unless `allow_nan` (default:
    the `TD_ALLOW_NAN` setting) lets it through as NaN; an integer variable
    with one then becomes float64.
    """
    return blocks.read_rank_block(path, variable, open_file, variable_of, allow_nan, "variable")

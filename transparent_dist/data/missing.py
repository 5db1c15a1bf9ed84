"""Missing values in the rows a rank read: found with whole-array numpy
operations, named by place, or turned into NaN when the user allows it.

```python
from transparent_dist.data import missing
where = missing.first(block, mask, fills)     # (index, reason) or None
if where is not None and not missing.allowed(allow_nan):
    ...                                        # name it: file, row, column
```

Missing is: NaN in a float array; an entry netCDF4 masked (its
`_FillValue`, `missing_value`, or outside its valid range); an entry equal
to an HDF5 dataset's `_FillValue` / `missing_value` attribute. The CSV
reader adds its own cells (empty, whitespace only, `NA`, `null`, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from transparent_dist.core import config

__all__ = ["HINT", "allowed", "fill_attributes", "first", "to_nan"]

HINT = "pass allow_nan=True (or set TD_ALLOW_NAN=1) to read missing values as NaN"

# Rows compared with a fill value at a time: bounds the temporary boolean
# array on a large block to a few MB.
_CHUNK_ELEMENTS = 1 << 22


def allowed(allow_nan: bool | None) -> bool:
    """The reader's keyword if given, else the `TD_ALLOW_NAN` setting."""
    return bool(config.SETTINGS.allow_nan if allow_nan is None else allow_nan)


def _first_true(flags: np.ndarray) -> int | None:
    flat = np.ravel(flags)
    index = int(np.argmax(flat)) if flat.size else 0
    return index if flat.size and flat[index] else None


def _first_nan(values: np.ndarray) -> int | None:
    if values.dtype.kind == "f":
        # min propagates NaN: one pass with no temporary array, the usual
        # (clean) case's whole cost.
        if not np.isnan(values.min()):
            return None
    elif values.dtype.kind != "c":
        return None
    return _first_true(np.isnan(values))


def _first_equal(values: np.ndarray, fill: Any) -> int | None:
    flat = np.ravel(values)
    step = _CHUNK_ELEMENTS
    for start in range(0, flat.size, step):
        hit = _first_true(flat[start : start + step] == fill)
        if hit is not None:
            return start + hit
    return None


def first(
    values: np.ndarray, mask: Any = None, fills: Sequence[tuple[str, Any]] = ()
) -> tuple[tuple[int, ...], str] | None:
    """The index of the first missing entry of `values` (in C order) and why
    it is missing, or None. `mask` is a netCDF4 mask (or None / nomask);
    `fills` are (attribute name, value) pairs whose value means missing."""
    if values.size == 0:
        return None
    found: list[tuple[int, str]] = []
    if mask is not None and mask is not np.ma.nomask and np.any(mask):
        index = _first_true(np.broadcast_to(mask, values.shape))
        found.append((index, f"masked, stored as {np.ravel(values)[index].item()!r}"))
    index = _first_nan(values)
    if index is not None:
        found.append((index, "NaN"))
    for name, fill in fills:
        index = _first_equal(values, fill)
        if index is not None:
            found.append((index, f"{np.ravel(values)[index].item()!r}, its {name}"))
    if not found:
        return None
    index, reason = min(found, key=lambda item: item[0])
    return tuple(int(i) for i in np.unravel_index(index, values.shape)), reason


def to_nan(
    values: np.ndarray, mask: Any = None, fills: Sequence[tuple[str, Any]] = ()
) -> np.ndarray:
    """A float copy of `values` with NaN where an entry is missing; integer
    arrays become float64 (NaN needs a float)."""
    target = values.dtype if values.dtype.kind in "fc" else np.dtype(np.float64)
    out = np.array(values, dtype=target)
    if mask is not None and mask is not np.ma.nomask:
        out[np.broadcast_to(mask, values.shape)] = np.nan
    for _, fill in fills:
        out[values == fill] = np.nan
    return out


def fill_attributes(attrs: Any) -> list[tuple[str, Any]]:
    """The CF missing-value attributes (`_FillValue`, `missing_value`) of an
    HDF5 dataset's `attrs`, as (name, value) pairs; NaN fills are left out
    (NaN is missing anyway)."""
    pairs = []
    for name in ("_FillValue", "missing_value"):
        if name in attrs:
            for value in np.ravel(np.asarray(attrs[name])):
                if np.asarray(value).dtype.kind in "iufc" and not np.isnan(value):
                    pairs.append((name, value))
    return pairs

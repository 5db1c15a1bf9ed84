"""This rank's rows of a CSV file, read as one byte range.

```python
from transparent_dist.data import read_csv
x, y = read_csv("train.csv", label="target")     # this rank's rows
```

The data part of the file (after the header) is cut into N byte ranges of
about equal size, each moved forward to the next line start, so a rank
reads about 1/N of the bytes and never the whole file. Rank 0 reads the
header and shares it. Parsing is pyarrow's C++ CSV reader. Fields must not
contain line breaks inside quotes (the byte split would cut them).
"""

from __future__ import annotations

import csv as stdlib_csv
import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from transparent_dist.core import world
from transparent_dist.core.errors import CollectiveError, together
from transparent_dist.core.sharding import rank_rows

__all__ = ["read_csv"]

_CHUNK = 4096  # boundary probes: small, so a rank reads little beyond its range


def _header(path: str, header: bool, delimiter: str) -> tuple[list[str] | None, int, int]:
    """(column names or None, byte offset where data starts, column count)."""
    with open(path, "rb") as f:
        first = f.readline()
    if not first.strip():
        raise CollectiveError(f"transparent_dist: {path} is empty")
    fields = next(stdlib_csv.reader([first.decode().rstrip("\r\n")], delimiter=delimiter))
    if header:
        return [name.strip() for name in fields], len(first), len(fields)
    return None, 0, len(fields)


def _line_start_at(f: Any, position: int, data_start: int, file_size: int) -> int:
    """The first line start at or after `position`."""
    if position <= data_start:
        return data_start
    f.seek(position - 1)
    offset = position - 1
    while True:
        chunk = f.read(_CHUNK)
        if not chunk:
            return file_size
        newline = chunk.find(b"\n")
        if newline >= 0:
            return offset + newline + 1
        offset += len(chunk)


def _locate_problem(
    block: bytes, names: list[str], wanted: list[str], path: str, first_line: int, delimiter: str
) -> str:
    """Where the first ragged or non-numeric row of `block` is (the slow,
    error-only path)."""
    lines = block.decode(errors="replace").split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        row = next(stdlib_csv.reader([line.rstrip("\r")], delimiter=delimiter))
        where = f"{path}, line {first_line + i}"
        if len(row) != len(names):
            return f"{where}: expected {len(names)} fields, found {len(row)}"
        for name in wanted:
            value = row[names.index(name)].strip()
            try:
                float(value)
            except ValueError:
                return f"{where}, column {name!r}: {value!r} is not a number"
    return f"{path}: could not parse lines {first_line}-{first_line + len(lines) - 1}"


def read_csv(
    path: str,
    label: str | int | None = None,
    columns: Sequence[str | int] | None = None,
    dtype: Any = "float32",
    header: bool = True,
    delimiter: str = ",",
) -> Any:
    """This rank's rows of a numeric CSV file: `(x, y)` with `label`, else `x`.

    `label` and `columns` name columns (or give their indices; without a
    header, only indices). `columns` defaults to every column but the label.
    All values are converted to `dtype` (the same on every rank); with
    `dtype=None` each column gets one type agreed by all ranks (int64 unless
    some rank saw a fraction, then float64). Rows are in file order, and the
    ranks' blocks in rank order make up the whole file.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv

    w = world.get()
    what = f"reading {path}"
    info = None
    with together(what):
        file_size = os.path.getsize(path)
        if w.is_root:
            info = _header(path, header, delimiter)
    if w.size > 1:
        info = w.comm.bcast(info, root=0)
    names, data_start, count = info
    names = names or [str(i) for i in range(count)]

    def column(key: str | int) -> str:
        if isinstance(key, int) and not isinstance(key, bool):
            if not -count <= key < count:
                raise KeyError(f"{path} has {count} columns; there is no column {key}")
            return names[key]
        if key not in names:
            raise KeyError(f"{path} has no column {key!r}; its columns: {', '.join(names)}")
        return key

    block, start = b"", data_start
    with together(what):
        label_name = None if label is None else column(label)
        features = (
            [column(c) for c in columns]
            if columns is not None
            else [n for n in names if n != label_name]
        )
        if file_size <= data_start:
            raise CollectiveError(f"transparent_dist: {path} has no data rows")
        span = file_size - data_start
        with open(path, "rb", buffering=0) as f:
            start = _line_start_at(f, data_start + span * w.rank // w.size, data_start, file_size)
            stop = _line_start_at(
                f, data_start + span * (w.rank + 1) // w.size, data_start, file_size
            )
            f.seek(start)
            block = f.read(stop - start)
    newlines = [block.count(b"\n")] if w.size == 1 else w.comm.allgather(block.count(b"\n"))
    first_line = 1 + (1 if header else 0) + sum(newlines[: w.rank])

    wanted = features + ([label_name] if label_name is not None else [])
    table = None
    with together(what):
        bad_rows: list[Any] = []

        def on_invalid(row: Any) -> str:
            bad_rows.append(row)
            return "skip"

        try:
            table = (
                None
                if not block.strip()
                else pacsv.read_csv(
                    io.BytesIO(block),
                    read_options=pacsv.ReadOptions(column_names=names),
                    parse_options=pacsv.ParseOptions(
                        delimiter=delimiter, invalid_row_handler=on_invalid
                    ),
                    convert_options=pacsv.ConvertOptions(
                        include_columns=wanted,
                        column_types={n: pa.float64() for n in wanted}
                        if dtype is not None
                        else None,
                    ),
                )
            )
        except pa.ArrowInvalid:
            bad_rows.append(None)
        if bad_rows:
            raise CollectiveError(
                "transparent_dist: "
                + _locate_problem(block, names, wanted, path, first_line, delimiter)
            )
        if dtype is None and table is not None:
            for name in wanted:
                if not pa.types.is_integer(
                    table.schema.field(name).type
                ) and not pa.types.is_floating(table.schema.field(name).type):
                    raise CollectiveError(
                        "transparent_dist: "
                        + _locate_problem(block, names, [name], path, first_line, delimiter)
                    )
    local_rows = 0 if table is None else table.num_rows
    rows = [local_rows] if w.size == 1 else w.comm.allgather(local_rows)
    if min(rows) == 0:
        raise CollectiveError(
            f"transparent_dist: {path} has {sum(rows)} data rows, too few for the {w.size} "
            f"ranks of this job (a rank would get none)"
        )

    def as_array(selected: list[str]) -> np.ndarray:
        target = dtype
        if target is None:
            # One type on every rank, even where one rank's rows alone look integral.
            local = any(pa.types.is_floating(table.schema.field(n).type) for n in selected)
            anywhere = local if w.size == 1 else any(w.comm.allgather(local))
            target = np.float64 if anywhere else np.int64
        arrays = [table.column(n).to_numpy() for n in selected]
        return rank_rows(np.column_stack(arrays).astype(target, copy=False))

    x = as_array(features)
    if label_name is None:
        return x
    return x, as_array([label_name])[:, 0]

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
import functools
import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from transparent_dist.core import collectives, world
from transparent_dist.core.collectives import together
from transparent_dist.core.errors import CollectiveError
from transparent_dist.core.sharding import rank_rows
from transparent_dist.data import missing

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


class _Unparsed(ValueError):
    """A ragged row, or a cell that is not what its column's type needs."""


@functools.cache
def _null_words() -> frozenset[str]:
    """The cells pyarrow reads as null (`NA`, `NaN`, `null`, `N/A`, ...)."""
    import pyarrow.csv as pacsv

    return frozenset(pacsv.ConvertOptions().null_values)


def _shown(value: str) -> str:
    if not value:
        return "empty cell"
    return "whitespace-only cell" if not value.strip() else repr(value.strip())


def _cell_problem(value: str, allow: bool) -> str | None:
    """What is wrong with one cell of a numeric column, or None."""
    text = value.strip()
    if not text or text in _null_words():
        return None if allow else f"missing value ({_shown(value)}); {missing.HINT}"
    try:
        number = float(text)
    except ValueError:
        return f"{text!r} is not a number"
    if number != number and not allow:  # NaN, in a spelling pyarrow does not list
        return f"missing value ({_shown(value)}); {missing.HINT}"
    return None


def _locate_problem(
    block: bytes,
    names: list[str],
    wanted: list[str],
    path: str,
    first_line: int,
    delimiter: str,
    allow: bool,
) -> str:
    """Where the first ragged, non-numeric or (unless `allow`) missing cell
    of `block` is (the slow, error-only path)."""
    lines = block.decode(errors="replace").split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        row = next(stdlib_csv.reader([line.rstrip("\r")], delimiter=delimiter))
        where = f"{path}, line {first_line + i}"
        if len(row) != len(names):
            return f"{where}: expected {len(names)} fields, found {len(row)}"
        for name in wanted:
            problem = _cell_problem(row[names.index(name)], allow)
            if problem is not None:
                return f"{where}, column {name!r}: {problem}"
    return f"{path}: could not parse lines {first_line}-{first_line + len(lines) - 1}"


def _line_of_row(block: bytes, row: int) -> int:
    """The index in `block` of the line pyarrow read as table row `row`
    (it skips empty lines), found with numpy over the bytes."""
    data = np.frombuffer(block, np.uint8)
    ends = np.flatnonzero(data == ord("\n"))
    starts = np.concatenate(([0], ends + 1))
    stops = np.concatenate((ends, [data.size]))
    lengths = stops - starts
    carriage = (lengths > 0) & (data[np.maximum(stops - 1, 0)] == ord("\r"))
    return int(np.flatnonzero(lengths - carriage > 0)[row])


def _missing_cell(
    block: bytes, row: int, name: str, names: list[str], path: str, first_line: int, delimiter: str
) -> str:
    """`path, line L, column 'c': missing value (...)` for table row `row`."""
    i = _line_of_row(block, row)
    line = block.split(b"\n", i + 1)[i].decode(errors="replace").rstrip("\r")
    cell = next(stdlib_csv.reader([line], delimiter=delimiter))[names.index(name)]
    return f"{path}, line {first_line + i}, column {name!r}: missing value ({_shown(cell)})"


def _parse(
    block: bytes, names: list[str], wanted: list[str], delimiter: str, column_type: Any
) -> Any:
    """The `wanted` columns of `block` as a pyarrow table, each of
    `column_type` (None: inferred); _Unparsed on a ragged row or a cell
    that does not convert."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    bad_rows: list[Any] = []

    def on_invalid(row: Any) -> str:
        bad_rows.append(row)
        return "skip"

    try:
        table = pacsv.read_csv(
            io.BytesIO(block),
            read_options=pacsv.ReadOptions(column_names=names),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=on_invalid),
            convert_options=pacsv.ConvertOptions(
                include_columns=wanted,
                column_types=None if column_type is None else {n: column_type for n in wanted},
                strings_can_be_null=True,
            ),
        )
    except pa.ArrowInvalid:
        raise _Unparsed from None
    if bad_rows:
        raise _Unparsed
    return table


def _as_numbers(table: Any, wanted: list[str], allow: bool, integral: bool) -> Any:
    """`table` with every wanted column numeric: a text column (whitespace-
    only cells; only when `allow`) trimmed, its null words null, then int64
    (if `integral` allows and every value is whole) or float64; an all-null
    column float64. _Unparsed on anything else."""
    import pyarrow as pa

    for name in wanted:
        column = table.column(name)
        kind = column.type
        if pa.types.is_null(kind):
            column = pa.nulls(len(column), pa.float64())
        elif pa.types.is_string(kind) and allow:
            import pyarrow.compute as pc  # here: the clean path never loads it

            text = pc.utf8_trim_whitespace(column)
            blank = pc.or_kleene(
                pc.equal(text, ""), pc.is_in(text, value_set=pa.array(sorted(_null_words())))
            )
            text = pc.if_else(blank, pa.scalar(None, pa.string()), text)
            try:
                column = pc.cast(text, pa.int64()) if integral else pc.cast(text, pa.float64())
            except pa.ArrowInvalid:
                column = pc.cast(text, pa.float64())  # a non-number raises here
        elif pa.types.is_integer(kind) or pa.types.is_floating(kind):
            continue
        else:
            raise _Unparsed
        table = table.set_column(table.schema.get_field_index(name), name, column)
    return table


def read_csv(
    path: str,
    label: str | int | None = None,
    columns: Sequence[str | int] | None = None,
    dtype: Any = "float32",
    header: bool = True,
    delimiter: str = ",",
    allow_nan: bool | None = None,
) -> Any:
    """This rank's rows of a numeric CSV file: `(x, y)` with `label`, else `x`.

    `label` and `columns` name columns (or give their indices; without a
    header, only indices). `columns` defaults to every column but the label.
    All values are converted to `dtype` (the same on every rank); with
    `dtype=None` each column gets one type agreed by all ranks (int64 unless
    some rank saw a fraction, then float64). Rows are in file order, and the
    ranks' blocks in rank order make up the whole file.

    A missing cell (empty, whitespace only, `NA`, `NaN`, `nan`, `null`, or
    another of pyarrow's null words) on any rank is an error naming the
    file, line and column, unless `allow_nan` (default: the `TD_ALLOW_NAN`
    setting) lets it through as NaN; a `dtype=None` column with one is then
    float64 on every rank, and an integer `dtype` refuses it.
    """
    import pyarrow as pa

    w = world.get()
    what = f"reading {path}"
    info = None
    with together(what):
        file_size = os.path.getsize(path)
        if w.is_root:
            info = _header(path, header, delimiter)
    if w.size > 1:
        info = collectives.broadcast_object(info, w.comm)
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
    newlines = collectives.allgather_object(block.count(b"\n"), w.comm)
    first_line = 1 + (1 if header else 0) + sum(newlines[: w.rank])

    wanted = features + ([label_name] if label_name is not None else [])
    allow = missing.allowed(allow_nan)
    table = None
    arrays: dict[str, np.ndarray] = {}
    with together(what):

        def problem(only: list[str]) -> CollectiveError:
            where = _locate_problem(block, names, only, path, first_line, delimiter, allow)
            return CollectiveError("transparent_dist: " + where)

        if block.strip():
            try:
                table = _parse(
                    block, names, wanted, delimiter, None if dtype is None else pa.float64()
                )
            except _Unparsed:
                # A whitespace-only cell fails pyarrow's conversion: allowed,
                # it is read again as text and converted below.
                if not allow:
                    raise problem(wanted) from None
            try:
                if table is None:
                    table = _parse(block, names, wanted, delimiter, pa.string())
                table = _as_numbers(table, wanted, allow, integral=dtype is None)
            except (_Unparsed, pa.ArrowInvalid):
                raise problem(wanted) from None
            arrays = {n: table.column(n).to_numpy() for n in wanted}
            # The check of the usual (clean) file: one numpy pass per column.
            hits = [
                (hit[0][0], names.index(n), n) for n in wanted if (hit := missing.first(arrays[n]))
            ]
            if hits:
                row, _, name = min(hits)
                where = _missing_cell(block, row, name, names, path, first_line, delimiter)
                if not allow:
                    raise CollectiveError(f"transparent_dist: {where}; {missing.HINT}")
                if dtype is not None and np.dtype(dtype).kind not in "fc":
                    raise CollectiveError(
                        f"transparent_dist: {where}: NaN does not fit dtype={dtype!r}; "
                        "read with a float dtype"
                    )
    local_rows = 0 if table is None else table.num_rows
    rows = collectives.allgather_object(local_rows, w.comm)
    if min(rows) == 0:
        raise CollectiveError(
            f"transparent_dist: {path} has {sum(rows)} data rows, too few for the {w.size} "
            f"ranks of this job (a rank would get none)"
        )

    def as_array(selected: list[str]) -> np.ndarray:
        target = dtype
        if target is None:
            # One type on every rank, even where one rank's rows alone look integral.
            local = any(arrays[n].dtype.kind == "f" for n in selected)
            anywhere = any(collectives.allgather_object(local, w.comm))
            target = np.float64 if anywhere else np.int64
        stacked = np.column_stack([arrays[n] for n in selected])
        return rank_rows(stacked.astype(target, copy=False))

    x = as_array(features)
    if label_name is None:
        return x
    return x, as_array([label_name])[:, 0]

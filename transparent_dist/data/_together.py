"""Errors that every rank raises together, so no rank is left waiting."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from transparent_dist import world
from transparent_dist.failures import CollectiveError


class DataError(CollectiveError):
    """Bad input data (missing file, dataset, column; bad rows; too few
    samples), raised with the same message on every rank."""


@contextlib.contextmanager
def together(what: str) -> Iterator[None]:
    """Runs the block on every rank; if it raised on any rank, every rank
    raises a DataError with the first failing rank's message."""
    w = world.get()
    error: BaseException | None = None
    try:
        yield
    except (OSError, KeyError, ValueError, IndexError, TypeError) as caught:
        error = caught
    if w.size == 1:
        if error is not None:
            raise _as_data_error(error, what) from error
        return
    messages = w.comm.allgather(None if error is None else _message(error, what))
    failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
    if failed:
        rank, message = failed[0]
        where = "" if len(failed) == w.size else f" (on rank {rank})"
        raise DataError(message + where) from error


def _message(error: BaseException, what: str) -> str:
    if isinstance(error, DataError):
        return str(error)
    if isinstance(error, FileNotFoundError):
        return f"transparent_dist: {what}: no such file: {error.filename or error}"
    return f"transparent_dist: {what}: {type(error).__name__}: {error}"


def _as_data_error(error: BaseException, what: str) -> DataError:
    return error if isinstance(error, DataError) else DataError(_message(error, what))

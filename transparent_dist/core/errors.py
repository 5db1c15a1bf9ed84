"""The one error class for "the same error on every rank", and the block
that makes any error so.

```python
from transparent_dist.core.errors import CollectiveError, together
with together("reading data.h5"):     # every rank raises, or none does
    open("data.h5").close()
```

A `CollectiveError` is raised by every rank at once (data that disagrees,
bad input, a call sequence that differs), so only rank 0 prints it and no
rank is left waiting (`failures`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from transparent_dist.core import world

__all__ = ["CollectiveError", "together"]


class CollectiveError(ValueError):
    """An error that every rank detects together (data disagreement, bad
    input): only rank 0 prints it."""


@contextlib.contextmanager
def together(what: str) -> Iterator[None]:
    """Runs the block on every rank; if it raised on any rank, every rank
    raises a CollectiveError with the first failing rank's message."""
    w = world.get()
    error: BaseException | None = None
    try:
        yield
    except (OSError, KeyError, ValueError, IndexError, TypeError) as caught:
        error = caught
    if w.size == 1:
        if error is not None:
            raise _as_collective(error, what) from error
        return
    messages = w.comm.allgather(None if error is None else _message(error, what))
    failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
    if failed:
        rank, message = failed[0]
        where = "" if len(failed) == w.size else f" (on rank {rank})"
        raise CollectiveError(message + where) from error


def _message(error: BaseException, what: str) -> str:
    if isinstance(error, CollectiveError):
        return str(error)
    if isinstance(error, FileNotFoundError):
        return f"transparent_dist: {what}: no such file: {error.filename or error}"
    return f"transparent_dist: {what}: {type(error).__name__}: {error}"


def _as_collective(error: BaseException, what: str) -> CollectiveError:
    return error if isinstance(error, CollectiveError) else CollectiveError(_message(error, what))

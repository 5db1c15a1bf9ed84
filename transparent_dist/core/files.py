"""Files the plugin writes, often in shared directories: never through a
planted symbolic link, never half-written under their final name.

```python
from transparent_dist.core import files
files.write_atomically("/scratch/me/run/latest", b"ckpt-000000000020\\n")
```

Every file is first created under a private temporary name in its final
directory with `O_CREAT | O_EXCL | O_NOFOLLOW` (an existing file or a link
under that name makes the call fail rather than be followed or truncated),
written and flushed to disk, then renamed over the final name; a failure on
the way removes the temporary file.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from typing import BinaryIO

__all__ = ["created", "fsync_directory", "write_atomically"]

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _temporary_name(path: str) -> str:
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def created(path: str, mode: int = 0o644) -> Iterator[BinaryIO]:
    """A new binary file that becomes `path` (by rename) when the block ends
    without error; on error nothing is left behind."""
    temporary = _temporary_name(path)
    fd = os.open(temporary, _FLAGS, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def write_atomically(path: str, data: bytes, mode: int = 0o644) -> None:
    """`data` as the whole of `path`, replaced in one rename."""
    with created(path, mode) as f:
        f.write(data)


def fsync_directory(path: str) -> None:
    """Makes the renames in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

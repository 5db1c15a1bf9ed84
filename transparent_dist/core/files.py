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

What the plugin later reads back and acts on (the compiled op it loads, the
checkpoint it resumes) must be this user's alone: `untrusted` says why a
file or directory is not, `private_directory` creates one that is.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["created", "fsync_directory", "private_directory", "untrusted", "write_atomically"]

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


def untrusted(path: str | Path, directory: bool) -> str:
    """Why what is at `path` must not be acted on (loaded, resumed, built
    into): "" when it is ours and only we can change it. A file another
    user could write decides what every rank runs the moment it is read."""
    try:
        info = os.lstat(path)
    except OSError as error:
        return f"cannot be checked ({error.strerror})"
    kind = stat.S_ISDIR if directory else stat.S_ISREG
    if not kind(info.st_mode):
        return "is a symbolic link or not a " + ("directory" if directory else "regular file")
    if info.st_uid != os.getuid():
        return f"is owned by uid {info.st_uid}, not by this user (uid {os.getuid()})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by group or others (mode {stat.S_IMODE(info.st_mode):o})"
    return ""


def _open_to_others(path: str) -> bool:
    """A directory anyone may rename entries in (world-writable, no sticky
    bit): what we create under it can be swapped for another's."""
    try:
        info = os.stat(path)
    except OSError:
        return False
    return bool(info.st_mode & stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX


def private_directory(path: str | Path, mode: int = 0o755) -> str:
    """Creates `path` (and its missing parents) unless it exists (OSError
    if it cannot be); returns "" when it is this user's directory, not a
    link, that only this user can write, in a parent where no one else can
    swap it, else why not."""
    path = os.path.abspath(path)
    # The mode (less the umask) is the leaf's. An existing link under the
    # name passes here and is refused by the check below.
    os.makedirs(path, mode=mode, exist_ok=True)
    reason = untrusted(path, directory=True)
    parent = os.path.dirname(path)
    if not reason and _open_to_others(parent):
        reason = f"is in {parent}, where anyone can rename it (world-writable, no sticky bit)"
    return reason

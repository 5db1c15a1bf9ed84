"""Compiling the native op and caching it: where the library lives, and
the checks that refuse a library or cache directory others could write.

```python
from transparent_dist.tf.native import build
path = build.build()          # compiles once per TensorFlow build, then cached
```

`exchange_op.cc` is compiled with the C++ compiler (`$CXX`, else `g++`)
against TensorFlow's own headers into a cache directory (`$TD_CACHE_DIR`,
else `$XDG_CACHE_HOME/transparent_dist`, else `~/.cache/transparent_dist`),
keyed by the source and TensorFlow build (not the compiler, so nodes
without one use an op built elsewhere). The cache is code that every rank
will run: a library (or the cache directory) that is not this user's, or
that others can write, is refused; a failed build leaves a marker so later
ranks fall back at once. Loading and calling the op is `op`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from transparent_dist.core import files, log

__all__ = [
    "SOURCE",
    "NativeBuildError",
    "build",
    "cache_dir",
    "compiled_here",
    "failure_marker",
    "library_path",
    "reset",
]

SOURCE = Path(__file__).with_name("exchange_op.cc")


class NativeBuildError(RuntimeError):
    """The native exchange could not be compiled."""


# Whether this process ran the compiler (failed or not), and how long a
# successful build took.
_BUILT: dict[str, float] = {"compiled": False, "seconds": 0.0}


def compiled_here() -> bool:
    """Whether this process ran the compiler (for the fit summary)."""
    return bool(_BUILT["compiled"])


def reset() -> None:
    """Forgets that this process compiled the op (`activation.reset`): a
    later load is not a build for the next fit's summary."""
    _BUILT.update(compiled=False, seconds=0.0)


def cache_dir() -> Path:
    explicit = os.environ.get("TD_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "transparent_dist"


def _compiler() -> str:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        raise NativeBuildError("no C++ compiler found (set CXX, or install g++)")
    return compiler


def _flags() -> list[str]:
    import tensorflow as tf

    return [*tf.sysconfig.get_compile_flags(), *tf.sysconfig.get_link_flags()]


def _build_command(output: Path) -> list[str]:
    return [
        _compiler(),
        "-shared",
        "-fPIC",
        "-O2",
        "-Wno-deprecated-declarations",
        str(SOURCE),
        "-o",
        str(output),
        *_flags(),
    ]


def library_path() -> Path:
    """Where the built op for this source and TensorFlow lives. The key does
    not name the compiler, so a compute node without one finds the op built
    on a login node."""
    import tensorflow as tf

    key = hashlib.sha256(SOURCE.read_bytes())
    for part in (tf.__version__, tf.__file__, *_flags()):
        key.update(part.encode())
    return cache_dir() / f"exchange_op-{key.hexdigest()[:16]}.so"


def _refuse_unless_trusted(path: Path, directory: bool) -> None:
    # A library another user could write would run its code in every rank
    # the moment it is loaded.
    reason = files.untrusted(path, directory)
    if reason:
        raise NativeBuildError(
            f"refusing to load or build the native op: {path} {reason}; a library planted "
            "there would run in every rank. Use a cache directory only you can write "
            "(chmod 700, or TD_CACHE_DIR)"
        )


def _private_cache() -> Path:
    directory = cache_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    _refuse_unless_trusted(directory, directory=True)
    return directory


def failure_marker(path: Path) -> Path:
    """Where a failed build of `path` leaves the compiler's message, so
    that later ranks and jobs fall back at once instead of compiling again."""
    return path.with_suffix(".failed")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    # O_NOFOLLOW: a symbolic link planted under the lock's name is refused,
    # never followed (and so never truncates what it points to).
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise NativeBuildError(
            f"the lock file {path} cannot be opened safely ({error.strerror}: a symbolic "
            "link there is refused, never followed)"
        ) from None
    try:
        if os.fstat(fd).st_uid != os.getuid():
            raise NativeBuildError(f"the lock file {path} belongs to another user")
        with contextlib.suppress(OSError):  # no flock on this file system: the rename holds
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def build(retry: bool = False) -> Path:
    """Compiles the op unless a build for this TensorFlow is cached; returns
    its path. Safe to run from many ranks at once: one compiles, under a
    file lock, into a private temporary directory, and the file appears by
    rename. A failed build is remembered (`failure_marker`) unless `retry`."""
    path = library_path()
    directory = _private_cache()
    marker = failure_marker(path)
    if path.exists():
        _refuse_unless_trusted(path, directory=False)
        return path
    if marker.exists() and not retry:
        raise NativeBuildError(_read_marker(marker))
    with _locked(path.with_suffix(".lock")):
        if path.exists():
            _refuse_unless_trusted(path, directory=False)
            return path
        if marker.exists() and not retry:
            raise NativeBuildError(_read_marker(marker))
        log.info(
            f"building the native gradient exchange (once for this TensorFlow, ~10 s) into {path}",
            once=True,
        )
        started = time.monotonic()
        _BUILT["compiled"] = True  # for the fit summary (`op.load`), failed or not
        with tempfile.TemporaryDirectory(dir=directory, prefix=".build-") as private:
            partial = Path(private) / path.name
            try:
                proc = subprocess.run(
                    _build_command(partial), capture_output=True, text=True, timeout=600
                )
                failure = (
                    ""
                    if proc.returncode == 0
                    else f"exit status {proc.returncode}\n{(proc.stderr or proc.stdout)[-2000:]}"
                )
            except (OSError, subprocess.TimeoutExpired, NativeBuildError) as error:
                failure = f"the compiler did not run: {error}"
            if failure:
                message = f"compiling {SOURCE.name} failed; the compiler said:\n{failure}"
                _write_marker(marker, message)
                raise NativeBuildError(message)
            os.chmod(partial, 0o755)
            os.replace(partial, path)
            marker.unlink(missing_ok=True)
        _BUILT["seconds"] = time.monotonic() - started
        log.info(f"native gradient exchange built in {_BUILT['seconds']:.1f} s", once=True)
    return path


def _write_marker(marker: Path, message: str) -> None:
    with contextlib.suppress(OSError):
        files.write_atomically(str(marker), message.encode())


def _read_marker(marker: Path) -> str:
    try:
        text = marker.read_text()[-2000:]
    except OSError:
        text = "(unreadable)"
    return (
        f"its build failed before, and the failure is remembered in {marker} "
        f"(`python -m transparent_dist build` tries again): {text}"
    )

"""Only rank 0 writes: standard output (the user's prints, progress bars),
and the framework calls that save files (wrapped with `root_only`).

```python
from transparent_dist.core import output
output.quiet_unless_root()   # done by `import transparent_dist`; TD_STDOUT=all keeps all
save = output.root_only(lambda path: open(path, "w").write("x"))
```

The descriptor itself is pointed at /dev/null on ranks other than 0, so
output from C extensions and subprocesses is silenced too. Python `logging`
records below WARNING follow the same rule (a script's `logging.info`
progress lines, once, not once per rank); warnings and errors from any rank
stay visible. Standard error
is left alone on every rank (errors must never be hidden), except while a
framework's C++ start-up runs (`start_up_quietly`: TensorFlow's oneDNN /
CUDA-probe lines, the same on every rank), unless `TD_VERBOSE=1` or the
script's environment sets `TF_CPP_MIN_LOG_LEVEL=0`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from transparent_dist.core import config, world

__all__ = ["quiet_unless_root", "restore", "root_only", "start_up_quietly"]


def root_only(original: Callable[..., Any]) -> Callable[..., Any]:
    """`original` on rank 0; a no-op returning None on the other ranks."""

    def on_root_only(*args: Any, **kwargs: Any) -> Any:
        if world.get().is_root:
            return original(*args, **kwargs)
        return None

    return on_root_only


_SAVED_FD: int | None = None
_SET_ENV: list[str] = []  # variables set here, removed by `restore`


def quiet_unless_root() -> None:
    global _SAVED_FD
    if world.get().is_root or config.SETTINGS.stdout == "all" or _SAVED_FD is not None:
        return
    # Records at INFO and below are dropped before any handler sees them,
    # whichever handlers the script configures later.
    logging.disable(logging.INFO)
    # TensorFlow's C++ INFO lines (a TF1 session's MLIR note, say) likewise;
    # its warnings and errors stay. Read when TensorFlow loads, so a script
    # that imported it before the plugin keeps them; the user's own level wins.
    if "TF_CPP_MIN_LOG_LEVEL" not in os.environ:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "1"
        _SET_ENV.append("TF_CPP_MIN_LOG_LEVEL")
    try:
        sys.stdout.flush()
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a real file (captured by a test runner, say)
    _SAVED_FD = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def restore() -> None:
    """Gives standard output and logging back (for tests)."""
    global _SAVED_FD
    if logging.root.manager.disable == logging.INFO:
        logging.disable(logging.NOTSET)
    while _SET_ENV:
        os.environ.pop(_SET_ENV.pop(), None)
    if _SAVED_FD is None:
        return
    sys.stdout.flush()
    os.dup2(_SAVED_FD, sys.stdout.fileno())
    os.close(_SAVED_FD)
    _SAVED_FD = None


def start_up_is_quiet() -> bool:
    """Whether this rank hides a framework's start-up lines on stderr."""
    return (
        not world.get().is_root
        and not config.SETTINGS.verbose
        and os.environ.get("TF_CPP_MIN_LOG_LEVEL") != "0"
    )


@contextlib.contextmanager
def start_up_quietly() -> Iterator[None]:
    """Standard error (the descriptor: C++ logging writes to it) goes to
    /dev/null while the block runs on ranks that hide start-up lines; it is
    back before any exception the block raises is reported."""
    if not start_up_is_quiet():
        yield
        return
    try:
        sys.stderr.flush()
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    saved = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, fd)
        os.close(saved)

"""Only rank 0 writes: standard output (the user's prints, progress bars),
and the framework calls that save files (wrapped with `root_only`).

```python
from transparent_dist import output
output.quiet_unless_root()   # done by `import transparent_dist`; TD_STDOUT=all keeps all
save = output.root_only(lambda path: open(path, "w").write("x"))
```

The descriptor itself is pointed at /dev/null on ranks other than 0, so
output from C extensions and subprocesses is silenced too. Standard error
is left alone on every rank: errors must never be hidden.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from transparent_dist import config, world


def root_only(original: Callable[..., Any]) -> Callable[..., Any]:
    """`original` on rank 0; a no-op returning None on the other ranks."""

    def on_root_only(*args: Any, **kwargs: Any) -> Any:
        if world.get().is_root:
            return original(*args, **kwargs)
        return None

    return on_root_only


_SAVED_FD: int | None = None


def quiet_unless_root() -> None:
    global _SAVED_FD
    if world.get().is_root or config.SETTINGS.stdout == "all" or _SAVED_FD is not None:
        return
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
    """Gives standard output back (for tests)."""
    global _SAVED_FD
    if _SAVED_FD is None:
        return
    sys.stdout.flush()
    os.dup2(_SAVED_FD, sys.stdout.fileno())
    os.close(_SAVED_FD)
    _SAVED_FD = None

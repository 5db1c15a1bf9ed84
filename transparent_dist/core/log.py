"""Rank-aware messages from the plugin, on standard error.

```python
from transparent_dist.core import log
log.info("shown once, by rank 0")
log.warning("shown by every rank that calls it, with its rank")
```
"""

from __future__ import annotations

import sys

from transparent_dist.core import config, world

__all__ = ["debug", "info", "reset", "warning"]

_SAID: set[str] = set()


def reset() -> None:
    """Forgets which messages were said (`activation.reset`)."""
    _SAID.clear()


def _emit(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def info(message: str, once: bool = True) -> None:
    """A message from rank 0 only (once per process unless `once=False`)."""
    if once:
        if message in _SAID:
            return
        _SAID.add(message)
    if world.get().is_root:
        _emit(f"transparent_dist: {message}")


def warning(message: str) -> None:
    w = world.get()
    _emit(f"transparent_dist [rank {w.rank}/{w.size}] WARNING: {message}")


def debug(message: str) -> None:
    """Only with TD_VERBOSE=1, on every rank."""
    if config.SETTINGS.verbose:
        w = world.get()
        _emit(f"transparent_dist [rank {w.rank}/{w.size}]: {message}")

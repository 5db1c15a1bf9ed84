"""Unmodified Keras / TensorFlow scripts, data-parallel under MPI.

```python
import transparent_dist          # the one line (or: python -m transparent_dist train.py)
import keras
print(transparent_dist.rank(), transparent_dist.size())
```

Importing the package starts the MPI world (only under an MPI launcher),
makes a failing rank end the whole job, keeps standard output to rank 0,
and arranges for the framework patches to be applied when the script
imports Keras or TensorFlow. It does not import either itself.
"""

from __future__ import annotations

from transparent_dist.core import world
from transparent_dist.core.config import configure
from transparent_dist.core.sharding import shard_range
from transparent_dist.runtime.activation import activate, deactivate
from transparent_dist.tf.exchange import average as average_gradients

__version__ = "0.1.0"
__all__ = [
    "activate",
    "average_gradients",
    "configure",
    "deactivate",
    "is_root",
    "local_rank",
    "local_size",
    "rank",
    "shard_range",
    "size",
]


def rank() -> int:
    """This process's rank in the job (0 without MPI)."""
    return world.get().rank


def size() -> int:
    """The number of ranks in the job (1 without MPI)."""
    return world.get().size


def local_rank() -> int:
    """This process's rank among the ranks on its node."""
    return world.get().local_rank


def local_size() -> int:
    """The number of ranks on this process's node."""
    return world.get().local_size


def is_root() -> bool:
    """Whether this process is rank 0, the one that prints and writes."""
    return world.get().rank == 0


activate()

"""One state for the host's random generators on every rank.

```python
from transparent_dist.core import host_random
host_random.agree()   # done at activation: rank 0's numpy and Python states everywhere
```

A script that never seeds `numpy.random` or `random` draws different
numbers on every rank: synthetic data (`np.random.normal(size=...)`)
differs between ranks, and Keras's `image_dataset_from_directory` (text,
audio) without `seed=` draws its seed from numpy and lists and shuffles
the files in another order on every rank, so the round-robin of batches
trains some images twice and others never. With rank 0's states on every
rank, each rank draws what rank 0 draws, which is what one process draws.
A script that seeds later (the usual place: after its imports) is
untouched; numpy's `default_rng()` without a seed takes fresh entropy at
each call and cannot be made alike from here.
"""

from __future__ import annotations

import random

from transparent_dist.core import collectives, world

__all__ = ["agree"]


def agree() -> None:
    """Gives every rank rank 0's numpy global and Python `random` states
    (a collective; once, at activation, on every rank)."""
    w = world.get()
    if w.size == 1:
        return
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with the stack
        np = None
    states = (random.getstate(), np.random.get_state() if np is not None else None)
    python_state, numpy_state = collectives.broadcast_object(states if w.is_root else None, w.comm)
    random.setstate(python_state)
    if np is not None and numpy_state is not None:
        np.random.set_state(numpy_state)

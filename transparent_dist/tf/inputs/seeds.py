"""The one place where the ranks agree on random seeds.

```python
import tensorflow as tf
from transparent_dist.tf.inputs import seeds
seeds.agree_on_global_seed(tf)   # at `import tensorflow`: unseeded scripts draw alike
seed = seeds.agreed_seed()       # rank 0's TF global seed, on every rank
```

Random ops the script leaves unseeded (a `tf.data` shuffle, say) must
draw alike on every rank, or sharding would drop and repeat samples; and
the orders our own pipelines draw (shuffled files, rank-local rows) come
from one seed every rank holds.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from types import ModuleType

from transparent_dist.core import collectives, world

__all__ = ["agree_on_global_seed", "agreed_seed", "common_global_seed"]


def _global_seed() -> int | None:
    from transparent_dist.tf import internals

    return internals.context.global_seed()


def _drawn_by_root() -> int:
    w = world.get()
    # Not the script's `random` stream: drawing from it on rank 0 only
    # would set rank 0's numbers apart from the other ranks' (host_random).
    seed = random.SystemRandom().randrange(2**31) if w.is_root else None
    return collectives.broadcast_object(seed, w.comm)


def agree_on_global_seed(tf: ModuleType) -> None:
    """Sets one TF global seed, drawn by rank 0, on every rank of a job
    whose script set none (called when TensorFlow is imported)."""
    if world.get().size > 1 and _global_seed() is None:
        tf.random.set_seed(_drawn_by_root())


def agreed_seed() -> int:
    """The script's TF global seed as rank 0 has it (0 if unset)."""
    w = world.get()
    seed = _global_seed() or 0
    return seed if w.size == 1 else collectives.broadcast_object(seed, w.comm)


@contextlib.contextmanager
def common_global_seed() -> Iterator[None]:
    """Makes the TF global seed equal on all ranks while a framework's own
    index pipeline is built, so every rank draws the same permutation. A
    seed the script set alike everywhere is used as is: then the
    permutation is the one the framework alone draws."""
    import tensorflow as tf

    w = world.get()
    seed = _global_seed()
    if w.size == 1:
        yield
        return
    seeds = collectives.allgather_object(seed, w.comm)
    if seed is not None and all(s == seed for s in seeds):
        yield
        return
    tf.random.set_seed(_drawn_by_root())
    try:
        yield
    finally:
        tf.random.set_seed(seed)

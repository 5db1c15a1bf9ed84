"""Which GPU and how many CPU threads each rank uses, chosen right after
TensorFlow is imported (before it initializes its devices).

```python
from transparent_dist.tf import placement
placement.gpu_for(local_rank=1, local_size=4, gpus=4)   # 1
placement.threads_for(cores=64, local_size=4)           # 16
```

- With GPUs, each rank on a node sees exactly one: the one numbered by its
  local rank (ranks on a node are found with MPI_Comm_split_type(SHARED)),
  with memory growth on, so four ranks on a 4-GPU node share nothing. When
  the launcher already gave each rank one GPU (`srun --gpus-per-task=1`
  sets CUDA_VISIBLE_DEVICES per task) that one is kept.
- Without GPUs, TensorFlow's intra-op threads default to the node's cores
  divided by its ranks, so oversubscribed ranks do not fight over cores.
- The user's own choice always wins: `TF_NUM_INTRAOP_THREADS`, settings made
  with `tf.config.threading` before the import hook runs, or
  `TD_PLACEMENT=off`.
"""

from __future__ import annotations

import os
from typing import Any

from transparent_dist.core import log, output, world

__all__ = ["apply", "gpu_for", "threads_for"]


def gpu_for(local_rank: int, local_size: int, gpus: int) -> int | None:
    """The index of the GPU a rank uses, or None without GPUs. More ranks
    than GPUs share them round-robin."""
    if gpus <= 0:
        return None
    return local_rank % gpus


def threads_for(cores: int, local_size: int) -> int:
    """Intra-op threads for one of `local_size` ranks on a node of `cores`."""
    return max(1, cores // max(1, local_size))


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0)) if world.get().local_size == 1 else os.cpu_count() or 1
    except AttributeError:
        return os.cpu_count() or 1


def apply(tf: Any) -> dict:
    """Applies the placement to a freshly imported TensorFlow; returns what
    it chose (for `doctor`)."""
    w = world.get()
    chosen: dict = {}
    if os.environ.get("TD_PLACEMENT", "").lower() in ("off", "0", "no"):
        return chosen
    # The first device query initializes CUDA: on a machine without a GPU
    # the CUDA build of TensorFlow says so (cuInit failed...) once per rank
    # unless this rank hides start-up lines.
    with output.start_up_quietly():
        gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        index = gpu_for(w.local_rank, w.local_size, len(gpus))
        try:
            tf.config.set_visible_devices(gpus[index], "GPU")
            tf.config.experimental.set_memory_growth(gpus[index], True)
            chosen["gpu"] = gpus[index].name
        except RuntimeError as error:  # devices were initialized already
            log.warning(f"could not pin this rank to one GPU: {error}")
    elif w.local_size > 1 and "TF_NUM_INTRAOP_THREADS" not in os.environ:
        threads = threads_for(_cores(), w.local_size)
        try:
            if tf.config.threading.get_intra_op_parallelism_threads() == 0:
                tf.config.threading.set_intra_op_parallelism_threads(threads)
                chosen["intra_op_threads"] = threads
        except RuntimeError:
            pass  # TensorFlow already started its thread pools: leave them
    if chosen:
        log.debug(f"placement: {chosen}")
    return chosen

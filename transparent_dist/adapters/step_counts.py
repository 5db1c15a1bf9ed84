"""`steps_per_epoch` and `validation_steps` of `fit` under N ranks.

A script computes its step counts for itself, alone: `steps_per_epoch =
n // batch_size` is one pass over its data at its own batch size. Under
N ranks each step takes N of the script's batches (N·b samples), so those
counts would make every epoch N passes, and a dataset sized for `epochs`
passes (`dataset.repeat(epochs)`) would run out after epochs / N. With
TD_STEPS=batches (the default) a step count counts the script's batches:
fit runs the same fraction of one pass as the script alone, in 1/N the
steps; TD_STEPS=global keeps the counts as global steps.

```python
from transparent_dist.adapters import step_counts
step_counts.scaled(60, step_counts.Pass(script_batches=60, job_steps=20), size=3)   # 20
step_counts.scaled(60, step_counts.Pass(None, None), size=3)                        # 20
```

N is the ranks the job started with (`World.batch_ranks`): after a lost
rank the survivors' steps still take N of the script's batches
(`keras_elastic`), so the counts stay the same.

Every number used is one every rank holds alike (the counts were agreed
by `phases.enter`, the lengths by the sharding), so no collective is
added.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from transparent_dist.core import config, log, world
from transparent_dist.core.shard_plan import DEFAULT_BATCH_SIZE
from transparent_dist.tf import inputs as tf_inputs

__all__ = ["Pass", "Passes", "adjust", "adjust_evaluate", "before_validation_is_sharded", "scaled"]

# Kinds whose global step takes N of the script's batches (arrays and files
# take the global batch over the script's batch: N, or 1 with
# TD_BATCH_SIZE=global). Data already split by rank, or not split at all,
# keeps the script's counts.
_SPLIT_STREAMS = ("dataset", "sequence", "generator")
_SPLIT_ROWS = ("arrays", "file")


@dataclasses.dataclass(frozen=True)
class Pass:
    """One pass over a call's data, as the script counts it (its batches)
    and as this job runs it (its steps); None where unknown (a stream)."""

    script_batches: int | None
    job_steps: int | None


@dataclasses.dataclass(frozen=True)
class Passes:
    """The passes of the training and the validation data of one `fit`,
    and how many script batches one global step takes when a pass is not
    known (None: the counts stay as they are)."""

    training: Pass
    validation: Pass
    per_step: int | None
    validation_per_step: int | None


def scaled(steps: int, one_pass: Pass, size: int) -> int:
    """The job's steps for `steps` of the script's batches: the same
    fraction of one pass when both lengths are known, else `steps // size`
    (exact for `n // b`: n // (N·b)); at least one."""
    if one_pass.script_batches and one_pass.job_steps:
        return max(1, steps * one_pass.job_steps // one_pass.script_batches)
    return max(1, steps // size)


def _length(x: Any) -> int | None:
    """Batches of a dataset or sequence when known and finite."""
    import tensorflow as tf

    if isinstance(x, tf.data.Dataset):
        cardinality = int(x.cardinality())
        return cardinality if cardinality > 0 else None
    if isinstance(x, (tuple, list, dict)) or hasattr(x, "shape"):
        return None
    if hasattr(x, "__len__") and hasattr(x, "__getitem__"):
        # A sequence (Keras's PyDataset, or our part of one): its batches.
        try:
            return len(x) or None
        except TypeError:
            return None
    return None


def _script_batches(data: tf_inputs.Data, batch_size: int | None) -> int | None:
    if data.kind in _SPLIT_ROWS:
        return math.ceil(data.num_samples / (batch_size or DEFAULT_BATCH_SIZE))
    if data.kind in ("dataset", "sequence"):
        return _length(data.x)
    return None


def _per_step(data: tf_inputs.Data, batch_size: int | None) -> int | None:
    if data.kind in _SPLIT_STREAMS:
        return world.get().batch_ranks
    if data.kind in _SPLIT_ROWS:
        b = batch_size or DEFAULT_BATCH_SIZE
        return max(1, tf_inputs.global_batch(b) // b)
    return None


def _validation(fw: Any, a: dict) -> tuple[tf_inputs.Data | None, int | None]:
    vd = a["validation_data"]
    if vd is None:
        return None, None
    return fw.classify_validation(vd), a["validation_batch_size"]


def before_validation_is_sharded(
    fw: Any, a: dict, data: tf_inputs.Data, batch_size: int | None
) -> Passes:
    """What `adjust` needs from the data as the script passed it: called in
    `fit` once the training data is sharded (`a["x"]`) and before the
    validation data is."""
    vdata, vbatch = _validation(fw, a)
    vbatch = vbatch or batch_size
    return Passes(
        training=Pass(_script_batches(data, batch_size), _length(a["x"])),
        validation=Pass(None if vdata is None else _script_batches(vdata, vbatch), None),
        per_step=_per_step(data, batch_size),
        validation_per_step=None if vdata is None else _per_step(vdata, vbatch),
    )


def _say(given: dict[str, int], run: dict[str, int], per_step: int) -> None:
    size = world.get().batch_ranks
    names = " and ".join(f"{k}={v}" for k, v in given.items())
    steps = " and ".join(str(v) for v in run.values())
    kept = " and ".join(str(v) for v in given.values())
    log.info(
        f"fit: {names} count batches of the script's own batch size (TD_STEPS=batches): "
        f"on {size} ranks a step takes {per_step} of them, so fit runs {steps} steps and an "
        f"epoch covers the data it covers in one process. Set TD_STEPS=global to run {kept} "
        f"steps of {per_step} batches each (every epoch then {per_step} times the data)."
    )


def _counting_batches() -> bool:
    return config.SETTINGS.steps == "batches" and world.get().batch_ranks > 1


def _rewrite(a: dict, name: str, one_pass: Pass, per_step: int | None) -> int | None:
    """Sets `a[name]`, a count of the script's batches, to this job's steps;
    returns the script's count where it changed (None: left as it was)."""
    steps = a.get(name)
    if not steps or per_step is None or per_step == 1:
        return None
    a[name] = scaled(int(steps), one_pass, per_step)
    return int(steps)


def adjust(a: dict, passes: Passes) -> None:
    """Rewrites `a["steps_per_epoch"]` and `a["validation_steps"]` (fit's
    bound arguments, every input sharded) from the script's batches to this
    job's steps, and says so once on rank 0 (TD_STEPS=batches)."""
    if not _counting_batches():
        return
    validation = dataclasses.replace(passes.validation, job_steps=_length(a["validation_data"]))
    given, run = {}, {}
    for name, one_pass, per_step in (
        ("steps_per_epoch", passes.training, passes.per_step),
        ("validation_steps", validation, passes.validation_per_step),
    ):
        steps = _rewrite(a, name, one_pass, per_step)
        if steps is not None:
            given[name], run[name] = steps, a[name]
    if given:
        _say(given, run, passes.per_step or passes.validation_per_step or 1)


def adjust_evaluate(a: dict, data: tf_inputs.Data, batch_size: int | None) -> None:
    """`evaluate(steps=k)` as fit's `validation_steps=k`: k of the script's
    batches (TD_STEPS=batches), so a script's `evaluate` covers what its
    validation covered. `a` holds evaluate's bound arguments, `x` sharded;
    `data` and `batch_size` are the script's."""
    if not _counting_batches():
        return
    one_pass = Pass(_script_batches(data, batch_size), _length(a["x"]))
    steps = _rewrite(a, "steps", one_pass, _per_step(data, batch_size))
    if steps is not None:
        log.info(
            f"evaluate: steps={steps} counts batches of the script's own batch size "
            f"(TD_STEPS=batches): on {world.get().batch_ranks} ranks it runs {a['steps']} steps"
        )

"""The identity of a Keras `fit`, recorded in its checkpoints and compared
on resume (`core.run_identity`): the same script resumes, another
experiment in the same `TD_CHECKPOINT_DIR` is refused.

```python
identity, limits = keras_identity.of_fit(fw, model, data, epochs=10)
```

What goes in is what decides the numbers the run produces, and nothing that
may change between the runs of one job:

- the model: each variable's shape and dtype, in order (not the names:
  Keras numbers them per process, "dense_1");
- the compile settings: optimizer class and hyperparameters (the learning
  rate as compiled, before any callback changes it), loss, metrics
  (`calls.compile_settings`, the same values the ranks compare);
- the data: its kind, sample count, per-sample shapes and dtypes and a
  hash of a few rows spread over it (for arrays and files: another file of
  the same shape differs there); a dataset's element spec and length.

Left out: the script's path and arguments (a job moved, or given another
output directory or more epochs, is still the same run), the epochs (a run
may be extended), the batch size and rank count (a resume at another rank
count or global batch is supported, `checkpoint.steps_to_skip`).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import tensorflow as tf

from transparent_dist.adapters import calls

__all__ = ["of_fit"]

# Rows hashed per array: enough to tell one data set from another, few
# enough to read from a file on disk in no time.
_ROWS = 8


def _dtype(value: Any) -> str:
    dtype = getattr(value, "dtype", None)
    return str(getattr(dtype, "name", dtype))


def _model(model: Any) -> list:
    return [[[None if d is None else int(d) for d in v.shape], _dtype(v)] for v in model.variables]


def _leaf(leaf: Any, n: int | None, on_disk: bool) -> dict:
    """Per-sample shape, dtype and (given `n` rows) a hash of a few."""
    if not on_disk and not isinstance(leaf, np.ndarray):
        leaf = np.asarray(leaf)  # lists, tensors, data frames
    shape = [None if d is None else int(d) for d in tuple(getattr(leaf, "shape", ()))[1:]]
    described: dict[str, Any] = {"shape": shape, "dtype": _dtype(leaf)}
    if n:
        digest = hashlib.sha256()
        for index in sorted({int(i) for i in np.linspace(0, n - 1, min(n, _ROWS))}):
            row = np.asarray(leaf[index])
            # Strings and other objects by value (their bytes are addresses).
            data = repr(row.tolist()).encode() if row.dtype == object else row.tobytes()
            digest.update(data)
        described["rows_sha256"] = digest.hexdigest()[:16]
    return described


def _data(data: Any) -> dict:
    described: dict[str, Any] = {"kind": data.kind}
    if data.kind in ("arrays", "file", "rank rows"):
        # Each rank's own rows ("rank rows") differ by rank and rank count:
        # only their shapes describe the run.
        n = data.num_samples if data.kind != "rank rows" else None
        if n is not None:
            described["samples"] = int(n)
        for name in ("x", "y", "sample_weight"):
            value = getattr(data, name)
            if value is not None:
                described[name] = [
                    _leaf(leaf, n, data.kind == "file") for leaf in tf.nest.flatten(value)
                ]
    elif data.kind == "dataset":
        described["element_spec"] = str(data.x.element_spec)
        described["batches"] = int(data.x.cardinality())
    elif data.kind == "sequence":
        described["class"] = type(data.x).__name__
        described["batches"] = len(data.x)
    return described


def of_fit(framework: Any, model: Any, data: Any, epochs: int) -> tuple[dict, dict]:
    """`(identity, limits)` of a `fit` of `model` on `data` (a classified
    `tf.inputs.Data`, the whole data before sharding): the identity as
    above, and the bounds a checkpoint's numbers must keep
    (`checkpoint.validate`)."""
    described = _data(data)
    identity = {
        "framework": framework.name,
        "model": _model(model),
        "compile": calls.compile_settings(model),
        "data": described,
    }
    limits = {"epochs": int(epochs)}
    if "samples" in described:
        limits["samples"] = described["samples"]
    return identity, limits

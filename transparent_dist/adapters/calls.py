"""A patched `fit` / `evaluate` / `predict` call: its arguments by name, the
check that every rank makes the same call (and compiled alike), and
`predict`'s rows gathered.

```python
from transparent_dist.adapters import calls
a = calls.bind(original_fit, model, args, kwargs)   # {"self": model, "x": ..., "epochs": 1, ...}
calls.enter_phase("fit", a)                         # every rank makes the same call
history = calls.call(original_fit, a)
```
"""

from __future__ import annotations

import inspect
from typing import Any

from transparent_dist.core import collectives, phases, world

__all__ = [
    "agree_on_compile",
    "bind",
    "call",
    "compile_settings",
    "enter_phase",
    "gathered_rows",
]


def bind(original: Any, self: Any, args: tuple, kwargs: dict) -> dict:
    """The arguments of a call to `original` (fit / evaluate / predict) by
    name, defaults filled in, so a wrapper can change some and pass on all."""
    bound = inspect.signature(inspect.unwrap(original)).bind(self, *args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    arguments.update(arguments.pop("kwargs", None) or {})
    return arguments


def call(original: Any, arguments: dict) -> Any:
    """Calls `original` with arguments from `bind`."""
    self = arguments.pop("self")
    return original(self, **arguments)


def gathered_rows(outputs: Any) -> Any:
    """`predict`'s outputs (nested numpy arrays) with every rank's rows, in
    rank order, on every rank."""
    import tensorflow as tf

    comm = world.get().comm
    return tf.nest.map_structure(lambda o: collectives.allgather_rows(o, comm), outputs)


# The arguments of fit / evaluate / predict that decide how many collectives
# the call issues: every rank must pass the same.
_DECIDING = (
    "batch_size",
    "epochs",
    "initial_epoch",
    "steps_per_epoch",
    "steps",
    "validation_steps",
    "validation_batch_size",
    "validation_freq",
)


def enter_phase(kind: str, arguments: dict) -> None:
    """`phases.enter` for a fit / evaluate / predict call, with the
    arguments that decide its collectives."""
    import numbers

    shown: dict[str, Any] = {}
    for name in _DECIDING:
        value = arguments.get(name)
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            value = int(value)
        if name in arguments:
            shown[name] = value
    if kind == "fit":
        shown["validation"] = arguments.get("validation_data") is not None or bool(
            arguments.get("validation_split")
        )
    phases.enter(kind, shown)


def compile_settings(model: Any) -> dict:
    """What `model.compile` was given (optimizer class and hyperparameters,
    loss, metrics), as plain values every rank can compare."""
    import json

    try:
        config = model.get_compile_config() or {}
    except Exception:  # noqa: BLE001 - a model compiled in a way we cannot read
        return {}
    # Through JSON: numpy scalars and other leaves become comparable values.
    # Object names are left out: Keras numbers them per process ("adam_1").
    return json.loads(
        json.dumps(config, sort_keys=True, default=repr),
        object_hook=lambda d: {k: v for k, v in d.items() if k != "name"},
    )


def agree_on_compile(model: Any) -> None:
    """Every rank compiled alike: one optimizer class and hyperparameters,
    one loss, one set of metrics (the variable shapes alone cannot tell
    Adam from AdamW, or one loss from another)."""
    collectives.check_agreement(
        "the compiled settings (optimizer, loss, metrics)",
        compile_settings(model),
        world.get().comm,
    )

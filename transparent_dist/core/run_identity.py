"""What a training run is, recorded in its checkpoints and compared on
resume, so that a checkpoint directory shared by two experiments (or reused
by the next one) is never silently resumed by the wrong run.

```python
from transparent_dist.core import run_identity
run_identity.differences({"lr": 0.01}, {"lr": 0.05})
# ['lr is 0.01 in the checkpoint, 0.05 in this run']
```

An identity is a tree of plain values (dicts, lists, numbers, strings) that
the adapter builds from what decides the numbers a run produces; for Keras
`fit` that is `adapters.keras_identity.of_fit`. This module only compares.
"""

from __future__ import annotations

from typing import Any

__all__ = ["differences"]

# Differences named in a refusal: enough to see what changed, short enough
# to read.
_SHOWN = 6


def _short(value: Any) -> str:
    # A float32 hyperparameter reads back as 0.009999999776482582: shown as set.
    text = f"{value:.7g}" if isinstance(value, float) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _walk(saved: Any, current: Any, path: str, found: list[str]) -> None:
    if isinstance(saved, dict) and isinstance(current, dict):
        for key in sorted(set(saved) | set(current), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in saved:
                found.append(f"{where} is new in this run ({_short(current[key])})")
            elif key not in current:
                found.append(f"{where} ({_short(saved[key])}) is not in this run")
            else:
                _walk(saved[key], current[key], where, found)
        return
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        for index, (a, b) in enumerate(zip(saved, current, strict=True)):
            _walk(a, b, f"{path}[{index}]", found)
        return
    if isinstance(saved, list) and isinstance(current, list):
        found.append(f"{path} has {len(saved)} entries in the checkpoint, {len(current)} here")
        return
    if saved != current:
        found.append(f"{path} is {_short(saved)} in the checkpoint, {_short(current)} in this run")


def differences(saved: dict | None, current: dict | None) -> list[str]:
    """What differs between the identity a checkpoint recorded (`saved`)
    and this run's (`current`), one phrase each (the first few); empty when
    they agree or either is unknown (a checkpoint written without one)."""
    if saved is None or current is None:
        return []
    found: list[str] = []
    _walk(saved, current, "", found)
    if len(found) > _SHOWN:
        found = [*found[:_SHOWN], f"and {len(found) - _SHOWN} more"]
    return found

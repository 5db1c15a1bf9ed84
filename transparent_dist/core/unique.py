"""De-duplicating by identity: the same variable or metric reached twice
(shared layers, a metric listed twice, a model's and its optimizer's
lists overlapping) is exchanged or broadcast once.

```python
from transparent_dist.core import unique
a = [1.0]
unique.by_identity([a, a, [1.0]])   # [a, [1.0]]: equal but distinct objects both stay
```
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["by_identity"]


def by_identity(items: Iterable[Any]) -> list[Any]:
    """`items` without repeats (by identity, not equality: variables and
    tensors compare element-wise), in first-seen order."""
    seen: set[int] = set()
    out = []
    for item in items:
        if id(item) not in seen:
            seen.add(id(item))
            out.append(item)
    return out

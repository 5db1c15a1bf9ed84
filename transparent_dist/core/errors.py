"""The one error class for "the same error on every rank".

```python
from transparent_dist.core.errors import CollectiveError
raise CollectiveError("transparent_dist: the ranks disagree on ...")   # on every rank
```

A `CollectiveError` is raised by every rank at once (data that disagrees,
bad input, a call sequence that differs), so only rank 0 prints it and no
rank is left waiting (`failures`). The block that turns any error on one
rank into this error on all is `collectives.together`.
"""

from __future__ import annotations

__all__ = ["CollectiveError"]


class CollectiveError(ValueError):
    """An error that every rank detects together (data disagreement, bad
    input): only rank 0 prints it."""

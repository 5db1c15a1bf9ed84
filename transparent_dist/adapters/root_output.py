"""What a Keras call prints and writes only on rank 0: the progress bar,
and callback methods that must not act on the other ranks.

```python
from transparent_dist.adapters import root_output
root_output.output_on_root_only(arguments, callbacks)   # verbose=0 off rank 0
callback.on_train_end = root_output.no_op                 # silenced on this rank
```

Which callbacks run where is `keras_callbacks.for_framework(fw).for_this_rank`;
saving calls and standard output are `core.output`.
"""

from __future__ import annotations

from typing import Any

from transparent_dist.core import world

__all__ = ["no_op", "output_on_root_only"]


def no_op(*args: Any, **kwargs: Any) -> None:
    """Stands in for a callback method that must not act on this rank."""
    return None


def output_on_root_only(arguments: dict, callbacks: Any) -> None:
    """Sets the callbacks this rank runs (`callbacks`, from the framework's
    own rule) and turns the progress bar off on every rank but 0."""
    arguments["callbacks"] = callbacks
    if not world.get().is_root:
        arguments["verbose"] = 0

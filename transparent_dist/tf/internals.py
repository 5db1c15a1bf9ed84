"""TensorFlow's private modules that the package patches or reads, all in
this one file: a TensorFlow upgrade that moves them touches only this.

```python
from transparent_dist.tf import internals
internals.context.global_seed()   # the script's TF global seed, or None
```
"""

from tensorflow.python.checkpoint import checkpoint
from tensorflow.python.client import session
from tensorflow.python.data.ops import dataset_ops
from tensorflow.python.eager import context
from tensorflow.python.eager.polymorphic_function import polymorphic_function
from tensorflow.python.framework import ops
from tensorflow.python.ops import variables
from tensorflow.python.summary.writer import writer
from tensorflow.python.training import monitored_session, saver
from tensorflow.python.training import optimizer as v1_optimizer

__all__ = [
    "checkpoint",
    "context",
    "dataset_ops",
    "monitored_session",
    "ops",
    "polymorphic_function",
    "saver",
    "session",
    "v1_optimizer",
    "variables",
    "writer",
]

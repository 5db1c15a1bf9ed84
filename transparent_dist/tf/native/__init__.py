"""The native gradient exchange: a TensorFlow op that calls MPI itself.

```python
import tensorflow as tf
from transparent_dist.tf import native
if native.load():                      # builds once per TF version, then cached
    mean, = native.allreduce([tf.ones(3)], weight=1.0)
    totals = native.negotiate(1.0)     # a step's buckets share one round trip
```

Two modules: `build` compiles `exchange_op.cc` against TensorFlow's headers
into a private cache (once per machine image, ~7 s, by one rank per node;
`python -m transparent_dist build` does it ahead of a job) and refuses a
library others could write; `op` loads it into every rank or none
(`TD_NATIVE=auto|on|off`) and calls it. Their public names are here too:
`native.build` is the function (`native.build.build`), the module being
`transparent_dist.tf.native.build` in `sys.modules`.
"""

from __future__ import annotations

from transparent_dist.tf.native.build import (
    SOURCE,
    NativeBuildError,
    build,
    cache_dir,
    failure_marker,
    library_path,
)
from transparent_dist.tf.native.op import DTYPES, WIRES, allreduce, load, negotiate, status

__all__ = [
    "DTYPES",
    "SOURCE",
    "WIRES",
    "NativeBuildError",
    "allreduce",
    "build",
    "cache_dir",
    "failure_marker",
    "library_path",
    "load",
    "negotiate",
    "status",
]

"""`import transparent_dist.tensorflow as tf` is `import tensorflow as tf`
with the plugin on.

```python
import transparent_dist.tensorflow as tf
print(tf.__version__)
```
"""

import sys

import tensorflow as _tensorflow

import transparent_dist  # noqa: F401 - activates the plugin

sys.modules[__name__] = _tensorflow

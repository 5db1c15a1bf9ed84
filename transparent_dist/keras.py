"""`from transparent_dist import keras` is `import keras` with the plugin on.

```python
from transparent_dist import keras
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
```
"""

import sys

import keras as _keras

import transparent_dist  # noqa: F401 - activates the plugin

# The import system hands out whatever this name maps to once the module has
# run: the real Keras, so the alias is Keras itself, not a copy of it.
sys.modules[__name__] = _keras

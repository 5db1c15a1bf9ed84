"""The drop-in import aliases in place of the script's own import lines:
they must be Keras and TensorFlow themselves, with the plugin on. The body
is tiny_plain.py's (whose `import keras` then finds the same module)."""

import os
import runpy
import sys

import transparent_dist.tensorflow as tf
from transparent_dist import keras

assert keras is sys.modules["keras"] and tf is sys.modules["tensorflow"]
assert keras.Model.fit.__td_original__  # patched: the plugin is on
runpy.run_path(os.path.join(os.path.dirname(__file__), "tiny_plain.py"), run_name="__main__")

"""tiny_plain.py with the one added line, `import transparent_dist`, on top."""
# ruff: noqa: I001 - the added line goes on top, as a user would put it

import transparent_dist  # noqa: F401  (the one line)

import os  # noqa: E402
import runpy  # noqa: E402

runpy.run_path(os.path.join(os.path.dirname(__file__), "tiny_plain.py"), run_name="__main__")

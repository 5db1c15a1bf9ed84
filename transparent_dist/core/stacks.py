"""The Python stack of the main thread, formatted for a message.

```python
from transparent_dist.core import stacks
sys.stderr.write(stacks.main_thread_stack())   # from any thread
```

Used where the main thread cannot speak for itself: a rank stalled in a
collective (`stall`) and a signal the blocked main thread did not act on
(`signals`).
"""

from __future__ import annotations

import os
import sys
import threading
import traceback

__all__ = ["main_thread_stack"]


def main_thread_stack() -> str:
    """The Python stack of the main thread, formatted, without the frames
    of the interpreter's and our own command-line runner."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    if frame is None:
        return "(no frame)\n"
    runner = os.path.join("transparent_dist", "__main__.py")
    frames = [
        f
        for f in traceback.extract_stack(frame)
        if not f.filename.startswith("<frozen") and not f.filename.endswith(runner)
    ]
    return "".join(traceback.format_list(frames))

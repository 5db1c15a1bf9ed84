"""Records what a script sees of its own invocation, then exits with
status int(argv[2]) (a nonzero status on rank 0 only when argv[3] == 'root')."""

import json
import os
import sys

out = sys.argv[1]
rank = int(os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", 0)))
with open(os.path.join(out, f"context-rank{rank}.json"), "w") as f:
    json.dump(
        {
            "argv": sys.argv,
            "file": __file__,
            "name": __name__,
            "path0": sys.path[0],
            "tf_loaded": "tensorflow" in sys.modules,
        },
        f,
    )
code = int(sys.argv[2]) if len(sys.argv) > 2 else 0
if len(sys.argv) > 3 and sys.argv[3] == "root" and rank != 0:
    import time

    time.sleep(120)  # the others would wait forever without the plugin
sys.exit(code)

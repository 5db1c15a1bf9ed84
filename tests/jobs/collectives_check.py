"""Exercises the buffer collectives on real ranks; writes what each rank got."""

import json
import os
import sys

import numpy as np

from transparent_dist.core import collectives, world

w = world.get()
r, n = w.rank, w.size
out = {}
# Weighted mean with a rank of weight 0 holding NaN: it must count as nothing.
a = np.full(5, float(r + 1), np.float32)
b = np.arange(6, dtype=np.float64).reshape(2, 3) * (r + 1)
h = np.full(3, r + 1, np.float16)
if r == n - 1:
    a[:] = np.nan
weight = 0.0 if r == n - 1 else float(r + 1)
for _ in range(3):  # the fusion buffers are reused: results must not drift
    avg = collectives.allreduce_average([a, b, h], weight, w.comm)
out["avg"] = [x.tolist() for x in avg]
out["avg_dtypes"] = [str(x.dtype) for x in avg]
out["sum"] = [
    x.tolist()
    for x in collectives.allreduce_sum([np.array([r, 1], np.int64).astype(np.float64)], w.comm)
]
values = [np.array(r * 10 + 1, np.int64), np.full((2, 2), r, np.float32)]
out["bcast"] = [x.tolist() for x in collectives.broadcast(values, w.comm)]
rows = np.arange(r * 2, dtype=np.float32).reshape(r, 2) if r else np.zeros((0, 2), np.float32)
out["gather"] = collectives.allgather_rows(rows, w.comm).tolist()
try:
    collectives.check_agreement("a test value", 7 if r == 0 else 8, w.comm)
    out["agree"] = None
except ValueError as error:
    out["agree"] = str(error)
collectives.check_agreement("an equal value", 3, w.comm)
with open(os.path.join(sys.argv[1], f"coll-rank{r}.json"), "w") as f:
    json.dump(out, f)

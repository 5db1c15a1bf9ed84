"""Runs scripts of the corpus (tests/corpus/) one after the other in one
process, as their users would run them, and records what they trained.

    mpiexec -n N python -m transparent_dist corpus_runner.py OUT plugin B a.py b.py ...
    python corpus_runner.py OUT reference B*N a.py b.py ...   # plain Keras, global batch
    mpiexec -n N python corpus_runner.py OUT control B a.py ...    # no plugin

Each script gets `--batch-size B` and runs as `__main__` in its own working
directory (OUT/<mode>/<script>/). Nothing in the scripts knows about this
runner: it watches from outside, wrapping `keras.Model.fit` and `evaluate`
to keep their History and results, and reading every model's weights
after the script returns. Each rank writes OUT/<mode>-rank<r>.json:
{script: {"histories": [...], "evaluations": [...], "weights": {model: [...]},
"error": str | None}}. Nothing here asserts.
"""

import gc
import json
import os
import runpy
import sys
import time
import traceback
import weakref
from pathlib import Path

OUT, MODE, BATCH = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
SCRIPTS = sys.argv[4:]
RANK = int(os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", 0)))

import keras  # noqa: E402
import numpy as np  # noqa: E402

RECORD: dict = {}


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return float(np.asarray(value))


def _watch(name, keep):
    original = getattr(keras.Model, name)

    def watched(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        keep(result)
        return result

    setattr(keras.Model, name, watched)


_watch("fit", lambda h: RECORD["current"]["histories"].append(_plain(h.history)))
_watch("evaluate", lambda r: RECORD["current"]["evaluations"].append(_plain(r)))


# Every model seen so far (weakly: a finished script's models may go). One
# scan of the heap per script, no forced collection: with TensorFlow loaded,
# gc.collect() and a scan cost ~0.3 s and ~0.2 s each, per script and rank.
SEEN: weakref.WeakSet = weakref.WeakSet()


def _new_models():
    """The models made since the last call, with their trainable weights."""
    found = {}
    for obj in gc.get_objects():
        if not isinstance(obj, keras.Model) or obj in SEEN:
            continue
        SEEN.add(obj)
        if obj.built and obj.trainable_variables:
            found[obj.name] = np.concatenate(
                [np.asarray(v.numpy(), np.float64).ravel() for v in obj.trainable_variables]
            ).tolist()
    return found


results = {}
for script in SCRIPTS:
    path = Path(script).resolve()
    entry = {"histories": [], "evaluations": [], "weights": {}, "error": None}
    RECORD["current"] = entry
    workdir = OUT / MODE / path.stem
    workdir.mkdir(parents=True, exist_ok=True)
    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy("float32")
    os.chdir(workdir)
    sys.argv = [str(path), "--batch-size", BATCH]
    results[path.stem] = entry
    start = time.perf_counter()
    try:
        namespace = runpy.run_path(str(path), run_name="__main__")
        entry["weights"] = _new_models()
        del namespace
    except BaseException:
        # Recorded, then raised on: a rank that failed must end the job (the
        # plugin aborts every rank), not leave the others waiting.
        entry["error"] = traceback.format_exc()[-3000:]
        raise
    finally:
        entry["seconds"] = round(time.perf_counter() - start, 2)
        (OUT / f"{MODE}-rank{RANK}.json").write_text(json.dumps(results))

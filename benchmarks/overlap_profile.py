"""One step of benchmarks/overlap.py's MLP on two shaped "nodes", traced:
TensorFlow's profiler (each forward and backward op of rank 0, on its
thread) and the plugin's timeline (when each gradient bucket is queued and
exchanged), both in ms from the start of the step.

    python benchmarks/overlap_profile.py [--rate 1gbit] [--fusion 4]
        [--setting MPIR_CVAR_ENABLE_HEAVY_YIELD=1 ...] [--out results/overlap_profile]

What it answers: does the backward pass slow down while a bucket is in
flight (compare an op's time with `--fusion 64`, where nothing is in flight
during the backward pass), and when does each bucket's gradient exist
against when its exchange starts. Needs what overlap.py needs (root, `ip
netns`, `tc`); about 30 s. Profiles the 6th step (5 warm-up steps).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROFILED = 5  # the step profiled (0-based): after tracing and warm-up
# The ops worth a line: matmuls (forward ones fused with the activation), the
# loss, and the plugin's own ops.
OPS = ("MatMul", "SparseSoftmax", "ReluGrad", "TdAllreduce", "TdNegotiate")


def _worker(out: Path) -> None:
    """Rank r: fits the MLP for PROFILED + 2 steps, the PROFILED-th under
    TensorFlow's profiler (OUT/prof<r>); writes OUT/start<r>.json, the
    time from the profiler's start to the step's and the step times."""
    import keras
    import numpy as np
    import tensorflow as tf

    import transparent_dist

    rank = transparent_dist.rank()
    from overlap import mlp  # the benchmark's own model (benchmarks/ is sys.path[0])

    model = mlp()
    steps = PROFILED + 2
    rng = np.random.default_rng(rank)
    x = rng.normal(size=(1024 * steps * transparent_dist.size(), 1024)).astype("float32")
    y = rng.integers(0, 10, size=len(x))
    record: dict = {"steps_ms": []}

    class Profile(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == PROFILED:
                # The profile's times count from its start, inside start():
                # the step starts `profiler_ms` after it (at most).
                before = time.perf_counter()
                tf.profiler.experimental.start(str(out / f"prof{rank}"))
                record["profiler_ms"] = 1e3 * (time.perf_counter() - before)
            self.started = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            record["steps_ms"].append(1e3 * (time.perf_counter() - self.started))
            if batch == PROFILED:
                tf.profiler.experimental.stop()

    model.fit(x, y, batch_size=1024, epochs=1, shuffle=False, verbose=0, callbacks=[Profile()])
    (out / f"start{rank}.json").write_text(json.dumps(record))


def _ops(out: Path, rank: int, offset_ms: float) -> list[tuple[float, float, str, str]]:
    """(start ms, duration ms, thread, op) of the profiled step's ops."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    path = glob.glob(str(out / f"prof{rank}" / "**" / "*.xplane.pb"), recursive=True)[0]
    space = xplane_pb2.XSpace()
    space.ParseFromString(Path(path).read_bytes())
    rows = []
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        names = {key: meta.name for key, meta in plane.event_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                name = names.get(event.metadata_id, "")
                if any(op in name for op in OPS):
                    begin = (line.timestamp_ns + event.offset_ps / 1e3) / 1e6 - offset_ms
                    short = name.replace("StatefulPartitionedCall/", "").split(":")[0]
                    rows.append((begin, event.duration_ps / 1e9, line.name[-8:], short))
    return sorted(rows)


def _buckets(out: Path, rank: int) -> list[tuple[float, float, str, str]]:
    """(start ms, duration ms, "plugin", span) of the profiled step's
    exchange spans, from the step's start (the plugin's own "step" span)."""
    events = json.loads((out / "timeline.json").read_text())
    events = events["traceEvents"] if isinstance(events, dict) else events
    mine = [e for e in events if e.get("ph") == "X" and e["pid"] == rank]
    step = [e for e in mine if e["name"] == "step"][PROFILED]
    begin, end = step["ts"], step["ts"] + step["dur"]
    rows = []
    for e in mine:
        if e["name"] in ("queued", "exchange", "wait") and begin <= e["ts"] <= end:
            label = f"{e['name']} bucket {e.get('args', {}).get('bucket', '')}".strip()
            rows.append(((e["ts"] - begin) / 1e3, e["dur"] / 1e3, "plugin", label))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    parser.add_argument("--rate", default="1gbit")
    parser.add_argument("--fusion", default="default", help="TD_FUSION_MB")
    parser.add_argument("--setting", nargs="+", default=[], metavar="NAME=VALUE")
    parser.add_argument("--out", default=str(HERE.parent / "results" / "overlap_profile"))
    args = parser.parse_args()
    if any("=" not in item for item in args.setting):
        parser.error("--setting takes NAME=VALUE")
    if args.worker:
        _worker(Path(args.worker))
        return 0
    import overlap  # benchmarks/ is sys.path[0]

    Cluster = overlap.harness("overlap_profile.py")  # noqa: N806 - the class
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("prof*"):
        shutil.rmtree(old)
    env = overlap._env(HERE.parent, 1)
    env.update(overlap._settings("+".join([args.fusion, *args.setting])))
    env["TD_TIMELINE"] = str(out / "timeline")
    with Cluster(nodes=2) as cluster:
        env.update(Cluster.environment())
        shaped = overlap._shape(cluster, args.rate)
        command = cluster.mpiexec(ranks=2, per_node=1)
        command += [sys.executable, "-m", "transparent_dist", __file__, "--worker", str(out)]
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"the job failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    record = json.loads((out / "start0.json").read_text())
    print(f"{shaped}; TD_FUSION_MB={args.fusion} {' '.join(args.setting)}")
    print("steps ms: " + ", ".join(f"{t:.0f}" for t in record["steps_ms"]))
    print(f"rank 0, step {PROFILED} ({record['steps_ms'][PROFILED]:.1f} ms), ms from its start:")
    print(f"{'start':>8} {'ms':>7}  {'thread':8}  what")
    print(f"(the profile's times shifted by {record['profiler_ms']:.1f} ms, the profiler's start)")
    rows = sorted(_ops(out, 0, record["profiler_ms"]) + _buckets(out, 0))
    for begin, duration, thread, what in rows:
        print(f"{begin:8.1f} {duration:7.1f}  {thread:8}  {what}")
    (out / "steps.json").write_text(json.dumps({"rows": rows, **record}, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.exit(main())

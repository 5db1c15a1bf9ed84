"""Bucket size and overlap on one node: the step time of 2 ranks for several
`TD_FUSION_MB`, next to the compute floor (two plain processes at once) and
a raw Allreduce of the same bytes, with how much exchange time the timeline
shows hidden behind the backward pass.

    python benchmarks/overlap_buckets.py [--model mlp] [--fusion 64 4 1] [--repeats 3]
        [--tree DIR] [--label after] [--env KEY=VALUE ...] [--out results/overlap_buckets.json]

`--tree` times another checkout's plugin (e.g. the code before a change) with
this worker; results are appended to OUT under `--label`. The worker is
benchmarks/exchange_worker.py (one compute thread per rank, as
exchange_scaling.py runs it). Columns (medians over repeats, ms): step,
floor (max of two plain processes' steps), raw (mpi4py Allreduce of the
exchanged bytes), exchange (sum of the buckets' exchange spans per step),
hidden (exchange time before the last bucket was queued), first (the first
bucket's exchange start, from the step's start), last (the last bucket
queued), idle (the communication thread idle before the last bucket: > 0
means it was waiting for the backward pass).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKER = str(HERE / "exchange_worker.py")
PYTHON = sys.executable
MPIEXEC = str(Path(PYTHON).parent / "mpiexec")
_COLUMNS = (
    "step_ms",
    "exchange_ms",
    "raw_allreduce_ms",
    "hidden_exchange_ms",
    "first_exchange_ms",
    "last_queued_ms",
    "idle_before_last_ms",
    "wait_ms",
)


_EXTRA: dict[str, str] = {}  # --env KEY=VALUE


def _env(tree: Path, fusion: float | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TD_")}
    env.update(_EXTRA)
    env.update(TF_CPP_MIN_LOG_LEVEL="3", TF_NUM_INTRAOP_THREADS="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(tree)
    if fusion is not None:
        env["TD_FUSION_MB"] = str(fusion)
    return env


def _result(output: str) -> dict:
    for line in output.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError("no result:\n" + output[-3000:])


def _worker(model: str, mode: str, batch: int, steps: int) -> list[str]:
    return [WORKER, "--model", model, "--mode", mode, "--batch", str(batch), "--steps", str(steps)]


def floor(tree: Path, model: str, batch: int, steps: int) -> float:
    """The slower of two plain processes run at once (no communication)."""
    procs = [
        subprocess.Popen(
            [PYTHON, *_worker(model, "plain", batch, steps)],
            env=_env(tree, None),
            cwd=tree,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    return max(_result(p.communicate(timeout=600)[0])["step_ms"] for p in procs)


def plugin(tree: Path, model: str, batch: int, steps: int, fusion: float) -> dict:
    command = [MPIEXEC, "-n", "2", PYTHON, "-m", "transparent_dist"]
    job = subprocess.run(
        [*command, *_worker(model, "td", batch, steps)],
        env=_env(tree, fusion),
        cwd=tree,  # `python -m` puts the working directory first on sys.path
        capture_output=True,
        text=True,
        timeout=600,
    )
    return _result(job.stdout + job.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp", choices=["mlp", "conv", "tiny"])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--fusion", type=float, nargs="+", default=[64.0, 4.0, 1.0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--floor", action="store_true", help="also time the compute floor")
    parser.add_argument("--tree", type=Path, default=HERE.parent)
    parser.add_argument("--label", default="this tree")
    parser.add_argument("--out", type=Path, default=Path("results/overlap_buckets.json"))
    parser.add_argument("--env", nargs="*", default=[], help="KEY=VALUE for every process")
    args = parser.parse_args()
    _EXTRA.update(item.split("=", 1) for item in args.env)
    rows = json.loads(args.out.read_text()) if args.out.exists() else []
    if args.floor:
        times = [floor(args.tree, args.model, args.batch, args.steps) for _ in range(args.repeats)]
        rows.append(
            {"label": "floor", "model": args.model, "batch": args.batch,
             "step_ms": statistics.median(times)}
        )  # fmt: skip
    for fusion in args.fusion:
        runs = [
            plugin(args.tree, args.model, args.batch, args.steps, fusion)
            for _ in range(args.repeats)
        ]
        row = {"label": args.label, "model": args.model, "batch": args.batch, "fusion_mb": fusion}
        for column in _COLUMNS:
            values = [r[column] for r in runs if column in r]
            if values:
                row[column] = statistics.median(values)
        row["buckets"] = runs[0].get("buckets", 1)
        row["exchange_bytes"] = runs[0].get("exchange_bytes")
        rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    print(f"{'label':>10} {'model':>5} {'MB':>5} {'bkts':>4} " + " ".join(
        f"{c.replace('_ms', '')[:9]:>9}" for c in _COLUMNS
    ))  # fmt: skip
    for row in rows:
        cells = " ".join(
            f"{row[c]:9.1f}" if isinstance(row.get(c), float) else f"{'':>9}" for c in _COLUMNS
        )
        fusion = row.get("fusion_mb", "")
        print(f"{row['label']:>10} {row['model']:>5} {fusion!s:>5} {row.get('buckets', ''):>4} "
              + cells)  # fmt: skip


if __name__ == "__main__":
    main()

"""Gradient exchange and scaling: transparent_dist against plain Keras and
tf.distribute's MultiWorkerMirroredStrategy, in one run.

    python benchmarks/exchange_scaling.py [--ranks 2 3 4] [--steps 40] [--out results/exchange]
    python benchmarks/exchange_scaling.py --plot-only docs/exchange_scaling.json   # redraw only

For a conv net and a large MLP, on the same synthetic data, with one
compute thread per rank (TF_NUM_INTRAOP_THREADS=1), it times:
  1. plain Keras, 1 process (the baseline);
  2. transparent_dist, 1 process (its overhead);
  3. transparent_dist on N ranks: weak-scaling efficiency (step time of 1
     process / step time of N, per-rank batch fixed), and the exchange time
     per step (median; from the moment all ranks have arrived: the time
     before, waiting for a late rank, is shown apart) divided by a raw
     mpi4py Allreduce of the same bytes measured in the same job, both
     ranks starting together (after a Barrier): in a tight loop ("raw",
     cache-hot) and between training steps ("loop", the cache state the
     exchange meets);
  4. MultiWorkerMirroredStrategy with 2 workers on loopback (in tf_keras:
     Keras 3 fails under it): step-time ratio transparent_dist / MWMS at 2.
And, as a control for the machine, two independent plain processes pinned
to the two cores: no communication, so their slower step time is the best
any 2-rank run can reach here.
Prints a table, writes OUT.json and OUT.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Per-step figures of an N-rank job (ms), medians over the repeated runs.
_TIMES = ("step_ms", "exchange_ms", "wait_ms", "raw_allreduce_ms", "raw_in_loop_ms")
WORKER = str(HERE / "exchange_worker.py")
PYTHON = sys.executable
MPIEXEC = str(Path(PYTHON).parent / "mpiexec")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TD_")}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", TF_NUM_INTRAOP_THREADS="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(HERE.parent) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _result(outputs: list[str]) -> dict:
    for output in outputs:
        for line in output.splitlines():
            if line.startswith("RESULT "):
                return json.loads(line[7:])
    raise RuntimeError("no result:\n" + "\n".join(o[-2000:] for o in outputs))


def _run(command: list[str], env: dict | None = None) -> dict:
    proc = subprocess.run(command, env=env or _env(), capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    return _result([proc.stdout])


def _median_of(runs: list[dict]) -> dict:
    """One row from repeated runs of a configuration. This VM's timings
    wander by tens of percent between runs: each figure is the median over
    the runs (all runs are kept in the JSON)."""
    row = {**runs[0], "runs": runs}
    for key in _TIMES:
        if key in runs[0]:
            row[key] = statistics.median(r[key] for r in runs)
    return row


def _pinned_pair(model: str, steps: int) -> dict:
    """The machine's own ceiling: two independent plain processes, one per
    core, no communication. The slower one bounds any 2-rank step time."""
    command = [PYTHON, WORKER, "--model", model, "--mode", "plain", "--steps", str(steps)]
    procs = [
        subprocess.Popen(
            ["taskset", "-c", str(core), *command],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for core in (0, 1)
    ]
    results = [_result([p.communicate(timeout=900)[0]]) for p in procs]
    slowest = max(results, key=lambda r: r["step_ms"])
    return {**slowest, "label": "2 plain processes, no exchange", "mode": "ceiling", "ranks": 2}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mwms(model: str, steps: int) -> dict:
    ports = [_free_port(), _free_port()]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for index in range(2):
        env = _env()
        env["TF_CONFIG"] = json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}}
        )
        procs.append(
            subprocess.Popen(
                [
                    "taskset",
                    "-c",
                    str(index),
                    PYTHON,
                    WORKER,
                    "--model",
                    model,
                    "--mode",
                    "mwms",
                    "--steps",
                    str(steps),
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"MWMS worker failed:\n{err[-3000:]}")
        outputs.append(out)
    return _result(outputs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default="results/exchange_scaling")
    parser.add_argument("--models", nargs="+", default=["conv", "mlp"])
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of each transparent_dist and plain job"
    )
    parser.add_argument(
        "--plot-only",
        metavar="JSON",
        help="redraw the plot from the JSON of an earlier run (OUT.json -> OUT.png); no runs",
    )
    args = parser.parse_args()
    if args.plot_only:
        plot_only(args.plot_only)
        return
    rows = []
    for model in args.models:
        common = ["--model", model, "--steps", str(args.steps)]
        # One core per rank: 1-process runs are pinned to one core, and up to
        # the number of cores, ranks are bound one per core.
        pin = ["taskset", "-c", "0"]
        # Alternated, so a slow spell of the machine hits both alike.
        plain_runs, td1_runs = [], []
        for _ in range(args.repeat):
            plain_runs.append(_run([*pin, PYTHON, WORKER, *common, "--mode", "plain"]))
            td1_runs.append(
                _run([*pin, PYTHON, "-m", "transparent_dist", WORKER, *common, "--mode", "td"])
            )
        plain, td1 = _median_of(plain_runs), _median_of(td1_runs)
        rows.append({**plain, "label": "plain Keras, 1 process"})
        rows.append(
            {
                **td1,
                "label": "transparent_dist, 1 process",
                "overhead": td1["step_ms"] / plain["step_ms"] - 1,
            }
        )
        ceiling = _median_of([_pinned_pair(model, args.steps) for _ in range(args.repeat)])
        ceiling["efficiency"] = td1["step_ms"] / ceiling["step_ms"]
        rows.append(ceiling)
        for ranks in args.ranks:
            bind = ["-bind-to", "core"] if ranks <= (os.cpu_count() or 1) else []
            command = [MPIEXEC, *bind, "-n", str(ranks), PYTHON, "-m", "transparent_dist"]
            td = _median_of(
                [_run([*command, WORKER, *common, "--mode", "td"]) for _ in range(args.repeat)]
            )
            td["label"] = f"transparent_dist, {ranks} ranks"
            td["efficiency"] = td1["step_ms"] / td["step_ms"]
            td["exchange_vs_raw"] = td["exchange_ms"] / td["raw_allreduce_ms"]
            td["exchange_vs_loop"] = td["exchange_ms"] / td["raw_in_loop_ms"]
            rows.append(td)
        try:
            mwms = _mwms(model, args.steps)
            mwms["label"] = "MultiWorkerMirroredStrategy, 2 workers"
            mwms["efficiency"] = td1["step_ms"] / mwms["step_ms"]
            ours = next(
                r for r in rows if r["model"] == model and r["mode"] == "td" and r["ranks"] == 2
            )
            ours["vs_mwms"] = ours["step_ms"] / mwms["step_ms"]
            rows.append(mwms)
        except Exception as error:  # noqa: BLE001 - reported in the table, the rest stands
            rows.append(
                {
                    "model": model,
                    "mode": "mwms",
                    "ranks": 2,
                    "label": "MWMS failed",
                    "error": str(error)[-500:],
                }
            )

    columns = [
        ("step_ms", "step ms", "8.2f"),
        ("efficiency", "eff.", "6.3f"),
        ("exchange_ms", "exch ms", "8.3f"),
        ("wait_ms", "wait ms", "8.3f"),
        ("raw_allreduce_ms", "raw ms", "7.3f"),
        ("raw_in_loop_ms", "loop ms", "8.3f"),
        ("exchange_vs_raw", "x/raw", "6.2f"),
        ("exchange_vs_loop", "x/loop", "6.2f"),
        ("vs_mwms", "vs MWMS", "7.2f"),
    ]

    def width(spec: str) -> int:
        return int(spec.split(".")[0])

    print(
        f"{'model':5} {'configuration':40} " + " ".join(f"{h:>{width(f)}}" for _, h, f in columns)
    )

    def fmt(value, spec):
        return format(value, spec) if isinstance(value, (int, float)) else "-"

    for r in rows:
        print(
            f"{r['model']:5} {r['label']:40} "
            + " ".join(f"{fmt(r.get(k), f):>{width(f)}}" for k, _, f in columns)
            + (f"  overhead {r['overhead']:+.1%}" if "overhead" in r else "")
        )
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.node(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(meta, f, indent=1)
    _plot(rows, args.out + ".png", meta)
    print(f"wrote {args.out}.json and {args.out}.png")


def _efficiencies(row: dict, baseline_ms: float) -> tuple[float, float, float]:
    """(median, lowest, highest) weak-scaling efficiency of `row`: the
    1-process median step time over each of its runs' step times (a row
    without repeats has no spread)."""
    runs = [baseline_ms / r["step_ms"] for r in row.get("runs", [])] or [
        baseline_ms / row["step_ms"]
    ]
    return baseline_ms / row["step_ms"], min(runs), max(runs)


def _draw(ax: object, points: list[dict], baseline_ms: float, dx: float = 0.0, **style) -> None:
    """One series: medians with bars from the lowest to the highest run,
    shifted by `dx` on the rank axis so points at one rank stay apart."""
    if not points:
        return
    stats = [_efficiencies(r, baseline_ms) for r in points]
    ax.errorbar(
        [r["ranks"] + dx for r in points],
        [m for m, _, _ in stats],
        yerr=[[m - lo for m, lo, _ in stats], [hi - m for m, _, hi in stats]],
        capsize=4,
        **style,
    )


def _plot(rows: list[dict], path: str, meta: dict) -> None:
    """Weak-scaling efficiency against ranks, one panel per model: ranks
    that fit on the cores joined by a line, oversubscribed ranks (more
    than the cores) drawn apart with open markers and never joined to
    them, and every point's spread (lowest to highest of its runs)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return
    cores = meta["cpus"]
    models = [m for m in ("conv", "mlp") if any(r["model"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.8), squeeze=False)
    for model, ax in zip(models, axes[0], strict=True):
        mine = [r for r in rows if r["model"] == model]
        single = next((r for r in mine if r["mode"] == "td" and r["ranks"] == 1), None)
        if single is None:
            continue
        baseline = single["step_ms"]
        ours = sorted((r for r in mine if r["mode"] == "td"), key=lambda r: r["ranks"])
        most = max(r["ranks"] for r in ours)

        _draw(
            ax,
            [r for r in ours if r["ranks"] <= cores],
            baseline,
            fmt="o-",
            color="C0",
            label=f"transparent_dist, 1-{cores} ranks (one core each)",
        )
        _draw(
            ax,
            [r for r in ours if r["ranks"] > cores],
            baseline,
            fmt="o",
            mfc="white",
            color="C3",
            label=f"transparent_dist, oversubscribed (> {cores} cores)",
        )
        _draw(
            ax,
            [r for r in mine if r["mode"] == "ceiling"],
            baseline,
            dx=-0.12,
            fmt="x",
            color="black",
            label="2 plain processes, no exchange (ceiling)",
        )
        _draw(
            ax,
            [r for r in mine if r["mode"] == "mwms" and "step_ms" in r],
            baseline,
            dx=0.12,
            fmt="s",
            color="C2",
            label="MultiWorkerMirroredStrategy (tf_keras), 1 run",
        )
        if most > cores:
            ax.axvspan(cores + 0.5, most + 0.5, color="grey", alpha=0.12, lw=0)
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_xticks(range(1, most + 1))
        ax.set_xlim(0.5, most + 0.5)
        ax.set_ylim(0, 1.2)
        params = single.get("params")
        ax.set_title(f"{model}" + (f" ({params:,} parameters)" if params else ""))
        ax.set_xlabel(f"ranks (shaded: more ranks than the {cores} cores)")
        ax.set_ylabel("weak-scaling efficiency")
    # One legend under both panels, where it hides no point.
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    runs = max((len(r.get("runs", [])) for r in rows), default=0)
    fig.suptitle(
        f"{meta['date']}, {cores} cores, {meta['processor']}: medians of {runs} runs, "
        "bars from the lowest to the highest run"
    )
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=100)


def plot_only(json_path: str) -> None:
    """Redraws the plot beside `json_path` (same name, .png) from the JSON
    of an earlier run, measuring nothing."""
    with open(json_path) as f:
        meta = json.load(f)
    png = str(Path(json_path).with_suffix(".png"))
    _plot(meta["rows"], png, meta)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()

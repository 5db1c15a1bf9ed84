"""Does the gradient exchange hide behind the backward pass? Two "nodes"
joined by a link shaped to 1 and 10 Gbit/s, 1 rank each, MPICH over TCP.

    python benchmarks/overlap.py [--rates 1gbit 10gbit] [--fusion default 1 4 16 64]
                                 [--repeat 3] [--steps 6] [--tree DIR] [--out results/overlap]
    python benchmarks/overlap.py --quick        # 1 run each, default settings only (~1.5 min)
    python benchmarks/overlap.py --plot-only results/overlap.json   # redraw only
    python benchmarks/overlap.py --merge a.json b.json --out docs/overlap   # join runs
    python benchmarks/overlap.py --rates 1gbit --fusion 4 4+MPIR_CVAR_ENABLE_HEAVY_YIELD=1 \
                                 --timeline DIR    # a setting of the ranks; TD_TIMELINE files

Needs root and `ip netns` (the harness of tests/netns_cluster.py: each node
a network namespace on a bridge, Hydra starting its ranks through `ip netns
exec`), and `tc`: each node's link is shaped on the way out with a token
bucket (`tc qdisc replace dev <veth> root tbf rate R burst B latency 50ms`;
B = R x 0.5 ms, at least 32 kB: a smaller bucket cannot keep a 10 Gbit/s
link full, the kernel refills it too rarely).

The model: an MLP of 6,316,042 float32 parameters (1024 -> 2048 -> 2048 ->
10, 25.3 MB of gradients), per-rank batch 1024 (`--batch`), synthetic data,
SGD, one compute thread per process (TF_NUM_INTRAOP_THREADS=1, as the
other benchmarks here). For each link rate it measures, as medians over
`--repeat` runs, each run the median of its steps after `--warmup`:
  T_c  compute alone: two plain Keras processes at once, no plugin, no
       network (what the two ranks of this 2-core machine get); the slower;
  T_x  a raw mpi4py Allreduce of the same number of floats over the shaped
       link (one process per node, Barrier before each call);
  T_s  the plugin's step: `python -m transparent_dist` on the two nodes,
       default settings and each TD_FUSION_MB of `--fusion`.
T_s / max(T_c, T_x) is 1 when the exchange hides completely behind compute
(or the reverse); T_s / (T_c + T_x) is 1 when nothing overlaps. The issue's
goal: T_s <= 1.10 x max(T_c, T_x) at 1 Gbit/s.

It also measures the raw Allreduce at message sizes from 8 B to 32 MB, over
each shaped link and over shared memory on one node, and fits
t(m) = alpha + beta * m (2 ranks: one exchange of m bytes, plus the sum):
the latency and inverse bandwidth that benchmarks/cost_model.py projects to
many nodes (docs/scaling.md).

`--tree DIR` runs the plugin from another checkout (its directory goes first
on PYTHONPATH; the workers and the harness stay this file's). Prints a
table, writes OUT.json and OUT.png (matplotlib, if installed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PYTHON = sys.executable
MPIEXEC = str(Path(PYTHON).parent / "mpiexec")
# Message sizes of the alpha-beta sweep, bytes (8 B to 32 MB).
SWEEP = [8, 64, 512, 4096, 32768, 262144, 2097152, 8388608, 33554432]


# ---------------------------------------------------------------- workers
# The same file runs as the driver and, with --role, as each job's process.


def mlp():
    """The benchmark's model (6.3 M parameters, ~25 MB of float32 gradients),
    compiled, its weights seeded: also what overlap_profile.py traces."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((1024,)),
            keras.layers.Dense(2048, activation="relu"),
            keras.layers.Dense(2048, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def _fit_worker(args: argparse.Namespace) -> None:
    """One timed fit of the MLP: plain (no plugin) or under `python -m
    transparent_dist` (`--plugin`); prints RESULT {...} (rank 0)."""
    import numpy as np

    rank, size = 0, 1
    if args.plugin:
        import transparent_dist

        rank, size = transparent_dist.rank(), transparent_dist.size()
        plugin_file = transparent_dist.__file__
    import keras

    model = mlp()
    steps = args.warmup + args.steps
    rng = np.random.default_rng(rank)
    # Per-rank batch `batch`: under the plugin the ranks share size x the rows.
    x = rng.normal(size=(args.batch * steps * size, 1024)).astype("float32")
    y = rng.integers(0, 10, size=len(x))
    times: list[float] = []

    class Steps(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            times.append(time.perf_counter() - self.start)

    if args.sync:
        # The plain pair starts its steps together (TensorFlow's import
        # takes seconds, never the same in both): so their timed steps
        # share the cores, as two ranks' do.
        directory, count = args.sync.rsplit(":", 1)
        Path(directory, str(os.getpid())).touch()
        deadline = time.time() + 120
        while len(os.listdir(directory)) < int(count) and time.time() < deadline:
            time.sleep(0.01)
    model.fit(x, y, batch_size=args.batch, epochs=1, shuffle=False, verbose=0, callbacks=[Steps()])
    result = {
        "step_ms": 1e3 * statistics.median(times[args.warmup :]),
        "steps_ms": [1e3 * t for t in times],
        "params": int(model.count_params()),
        "ranks": size,
    }
    if args.plugin:
        result["plugin_file"] = plugin_file
        try:  # which exchange ran (native op or numpy fallback); internal, may move
            from transparent_dist.tf import native

            result["exchange_path"] = native.status().split(" (")[0]
        except Exception as error:  # noqa: BLE001 - a label only
            result["exchange_path"] = f"unknown ({type(error).__name__})"
    if rank == 0:
        print("RESULT " + json.dumps(result), flush=True)


def _allreduce_worker(args: argparse.Namespace) -> None:
    """Raw mpi4py Allreduce (SUM, float32, in place) at each size of
    `--sizes`: both ranks released together by a Barrier, median of calls
    after 2 warm ones; repeated until ~1 s or 30 calls, at least 5."""
    import mmap

    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    out = {}
    for nbytes in args.sizes:
        count = max(1, nbytes // 4)
        # A fresh mapping on huge pages where the kernel has them, as the
        # plugin's op puts large gradients (MPI copies big messages faster).
        memory = mmap.mmap(-1, 4 * count, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                memory.madvise(mmap.MADV_HUGEPAGE)
            except OSError:
                pass
        buffer = np.frombuffer(memory, np.float32, count)
        buffer.fill(1.0)
        times: list[float] = []
        spent = 0.0
        while len(times) < 7 or (spent < 1.0 and len(times) < 32):
            comm.Barrier()
            start = time.perf_counter()
            comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
            times.append(time.perf_counter() - start)
            spent += times[-1]
            # Every rank must agree to stop (their clocks differ).
            spent = comm.allreduce(spent, op=MPI.MAX)
        out[str(4 * count)] = 1e3 * statistics.median(times[2:])
        del buffer
        memory.close()
    if comm.rank == 0:
        print("RESULT " + json.dumps({"ms": out, "ranks": comm.size}), flush=True)


# ----------------------------------------------------------------- driver


def _env(tree: Path, threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TD_")}
    env.update(
        TF_CPP_MIN_LOG_LEVEL="3",
        TF_NUM_INTRAOP_THREADS=str(threads),
        OMP_NUM_THREADS=str(threads),
        PYTHONPATH=str(tree) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


def _result(proc: subprocess.CompletedProcess | tuple, what: str) -> dict:
    out, err, code = (
        (proc.stdout, proc.stderr, proc.returncode)
        if isinstance(proc, subprocess.CompletedProcess)
        else proc
    )
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{what}: no result (exit {code})\n{err[-3000:]}")


def _worker_command(role: str, args: argparse.Namespace, plugin: bool = False) -> list[str]:
    command = [PYTHON, *(["-m", "transparent_dist"] if plugin else []), str(Path(__file__))]
    command += ["--role", role, "--batch", str(args.batch)]
    command += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    return command + (["--plugin"] if plugin else [])


def _settings(config: str) -> dict[str, str]:
    """The environment of the plugin's ranks for one `--fusion` value: a
    TD_FUSION_MB or `default`, then any `+NAME=VALUE` (e.g.
    `4+MPIR_CVAR_ENABLE_HEAVY_YIELD=1`: MPICH's waiting threads sleep)."""
    fusion, *extra = config.split("+")
    settings = dict(item.split("=", 1) for item in extra)
    if fusion != "default":
        settings["TD_FUSION_MB"] = fusion
    return settings


def _compute_pair(args: argparse.Namespace, env: dict) -> dict:
    """T_c: two plain processes at once (unpinned, as the cluster's ranks
    are); the slower one's median step."""
    import tempfile

    command = _worker_command("fit", args) + ["--sync", f"{tempfile.mkdtemp()}:2"]
    procs = [
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        results.append(_result((out, err, proc.returncode), "compute"))
    return max(results, key=lambda r: r["step_ms"])


def _burst(rate: str) -> str:
    """tbf's bucket: rate x 0.5 ms, at least 128 kB. Measured here: 32 kB
    holds 1 Gbit/s to 0.90 of line rate and 10 Gbit/s to 0.34; 64 kB and
    about 300 kB reach 0.95, the TCP payload's share of the frames. And a
    bucket smaller than a GSO packet (64 kB) makes tbf cut every such packet
    into frames in software: a 25 MB allreduce at 1 Gbit/s then cost both
    "nodes" together 216 ms of CPU (this machine's 2 cores, which the ranks'
    compute needs), against 44 ms with a 128 kB bucket, at the same 216-218
    ms on the link (benchmarks/link_cpu.py, docs/link_cpu.json; a real NIC
    would not take that CPU)."""
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    for unit, scale in units.items():
        if rate.lower().endswith(unit):
            bits = float(rate[: -len(unit)]) * scale
            return f"{max(128, int(bits * 0.5e-3 / 8 / 1024))}kb"
    raise ValueError(f"rate {rate!r}: give it as e.g. 1gbit, 500mbit")


def _shape(cluster: object, rate: str, burst: str | None = None) -> str:
    """Shapes every node's link on the way out, with tbf's bucket `burst`
    (by default `_burst(rate)`); returns the tc line used."""
    burst = burst or _burst(rate)
    for i, ns in enumerate(cluster.namespaces):
        dev = f"{cluster.tag}p{i}"
        command = ["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root"]
        command += ["tbf", "rate", rate, "burst", burst, "latency", "50ms"]
        subprocess.run(command, check=True, capture_output=True, text=True)
    return f"tbf rate {rate} burst {burst} latency 50ms"


def _fit_alpha_beta(ms: dict) -> dict:
    """t(m) = alpha + beta m, least squares on relative error (so small and
    large messages weigh alike)."""
    points = sorted((int(m), t * 1e-3) for m, t in ms.items())
    # Weighted normal equations, weights 1/t^2.
    sw = swm = swmm = swt = swmt = 0.0
    for m, t in points:
        w = 1.0 / (t * t)
        sw += w
        swm += w * m
        swmm += w * m * m
        swt += w * t
        swmt += w * m * t
    det = sw * swmm - swm * swm
    alpha = (swmm * swt - swm * swmt) / det
    beta = (sw * swmt - swm * swt) / det
    return {
        "alpha_us": 1e6 * alpha,
        "beta_ns_per_byte": 1e9 * beta,
        "bandwidth_GBps": 1e-9 / beta if beta > 0 else None,
    }


def _sweep(command: list[str], env: dict, args: argparse.Namespace, sizes: list[int]) -> dict:
    full = command + [PYTHON, str(Path(__file__)), "--role", "allreduce", "--sizes"]
    full += [str(s) for s in sizes]
    return _result(
        subprocess.run(full, env=env, capture_output=True, text=True, timeout=600), "allreduce"
    )


def harness(script: str) -> type:
    """The namespace harness's `Cluster` (tests/netns_cluster.py), for
    `script` and the other benchmarks that shape its link; SystemExit,
    naming `script`, where it cannot run (root, `ip netns`, `tc`)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from netns_cluster import Cluster

    why = Cluster.unavailable()
    if why:
        raise SystemExit(f"{script} needs the namespace harness: {why}")
    if shutil.which("tc") is None:
        raise SystemExit(f"{script} shapes the link with `tc` (iproute2): not found")
    return Cluster


def run(args: argparse.Namespace) -> dict:
    Cluster = harness("overlap.py")  # noqa: N806 - the class
    tree = Path(args.tree).resolve()
    if not (tree / "transparent_dist" / "__init__.py").exists():
        raise SystemExit(f"--tree {tree}: no transparent_dist/ there")
    env = _env(tree, args.threads)
    # The op compiled (or found in the cache) before any timing.
    subprocess.run(
        [PYTHON, "-m", "transparent_dist", "build"], env=env, check=True, capture_output=True
    )
    started = time.time()
    model_bytes = 4 * 6316042
    compute_runs = []
    # Shared memory on one node, for the cost model's intra-node alpha/beta.
    shm = _sweep([MPIEXEC, "-bind-to", "core", "-n", "2"], env, args, SWEEP)
    links = {"shm": {"ms": shm["ms"], **_fit_alpha_beta(shm["ms"])}}
    configs = ["default" if f == "default" else str(f) for f in args.fusion]
    plugin_runs: dict = {rate: {c: [] for c in configs} for rate in args.rates}
    raw_runs: dict = {rate: [] for rate in args.rates}
    with Cluster(nodes=2) as cluster:
        cluster_env = {**env, **Cluster.environment()}
        mpiexec = cluster.mpiexec(ranks=2, per_node=1)
        for rate in args.rates:
            tc = _shape(cluster, rate)
            sweep = _sweep(mpiexec, cluster_env, args, sorted({*SWEEP, model_bytes}))
            links[rate] = {"tc": tc, "ms": sweep["ms"], **_fit_alpha_beta(sweep["ms"])}
        # Repeats outermost, compute inside them: a slow spell of the
        # machine (its timings wander by 10-20 % here) hits every row alike.
        for _ in range(args.repeat):
            compute_runs.append(_compute_pair(args, env))
            print(f"  compute: {compute_runs[-1]['step_ms']:.1f} ms/step", flush=True)
            for rate in args.rates:
                _shape(cluster, rate)
                raw = _sweep(mpiexec, cluster_env, args, [model_bytes])
                raw_runs[rate].append(raw["ms"][str(model_bytes)])
                for config in configs:
                    job_env = {**cluster_env, **_settings(config)}
                    if args.timeline:
                        name = config.replace("=", "-").replace("+", "_")
                        job_env["TD_TIMELINE"] = str(Path(args.timeline) / f"{rate}-{name}")
                    proc = subprocess.run(
                        mpiexec + _worker_command("fit", args, plugin=True),
                        env=job_env,
                        capture_output=True,
                        text=True,
                        timeout=900,
                    )
                    result = _result(proc, f"plugin {rate} TD_FUSION_MB={config}")
                    if not Path(result["plugin_file"]).resolve().is_relative_to(tree):
                        raise SystemExit(
                            f"the ranks ran {result['plugin_file']}, not --tree {tree}'s plugin"
                        )
                    plugin_runs[rate][config].append(result)
                    print(
                        f"  {rate} {config}: {result['step_ms']:.1f} ms/step "
                        f"(raw {raw_runs[rate][-1]:.1f} ms)",
                        flush=True,
                    )
    t_c = statistics.median(r["step_ms"] for r in compute_runs)
    rows = []
    for rate in args.rates:
        t_x = statistics.median(raw_runs[rate])
        for config in configs:
            runs = plugin_runs[rate][config]
            t_s = statistics.median(r["step_ms"] for r in runs)
            rows.append(
                {
                    "rate": rate,
                    "fusion_mb": config.replace("MPIR_CVAR_", ""),
                    "t_c_ms": t_c,
                    "t_x_ms": t_x,
                    "t_s_ms": t_s,
                    "vs_max": t_s / max(t_c, t_x),
                    "vs_sum": t_s / (t_c + t_x),
                    "t_s_runs_ms": [r["step_ms"] for r in runs],
                    "t_x_runs_ms": raw_runs[rate],
                    "exchange_path": runs[0].get("exchange_path"),
                }
            )
    return {
        "meta": {
            "date": datetime.date.today().isoformat(),
            "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
            "tree": str(tree),
            "commit": _commit(tree),
            "batch_per_rank": args.batch,
            "params": compute_runs[0]["params"],
            "model_bytes": model_bytes,
            "steps": args.steps,
            "warmup": args.warmup,
            "repeat": args.repeat,
            "threads": args.threads,
            "seconds": round(time.time() - started, 1),
        },
        "t_c_runs_ms": [r["step_ms"] for r in compute_runs],
        "links": links,
        "rows": rows,
    }


def _commit(tree: Path) -> str | None:
    found = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return (found.stdout.strip() + ("+dirty" if dirty else "")) if found.returncode == 0 else None


def merge(parts: list[dict]) -> dict:
    """One result from several runs (each row keeps its own T_c): rows in
    order, links and compute runs joined, the first run's meta."""
    data = {"meta": dict(parts[0]["meta"]), "t_c_runs_ms": [], "links": {}, "rows": []}
    for part in parts:
        data["t_c_runs_ms"] += part["t_c_runs_ms"]
        data["links"].update(part["links"])
        data["rows"] += part["rows"]
    data["meta"]["seconds"] = sum(p["meta"]["seconds"] for p in parts)
    return data


def _rate_bits(rate: str) -> float:
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    unit = next((u for u in units if rate.lower().endswith(u)), None)
    return float(rate[: -len(unit)]) * units[unit] if unit else float("inf")


def _growth(rows: list[dict]) -> list[dict]:
    """How much of the slower link's extra transfer time the step pays: 1
    when none of it hides behind compute, 0 when all of it does. Measured
    against the fastest link, so the compute time cancels."""
    rates = sorted({r["rate"] for r in rows}, key=_rate_bits, reverse=True)
    out = []
    for slow in rates[1:]:
        for r in (r for r in rows if r["rate"] == slow):
            fast = next(
                (f for f in rows if f["rate"] == rates[0] and f["fusion_mb"] == r["fusion_mb"]),
                None,
            )
            if fast is None or r["t_x_ms"] == fast["t_x_ms"]:
                continue
            ratio = (r["t_s_ms"] - fast["t_s_ms"]) / (r["t_x_ms"] - fast["t_x_ms"])
            out.append({"from": rates[0], "to": slow, "fusion_mb": r["fusion_mb"], "ratio": ratio})
    return out


def table(data: dict) -> str:
    lines = [
        f"{'link':7} {'TD_FUSION_MB':>12} {'T_c ms':>8} {'T_x ms':>8} {'T_s ms':>8} "
        f"{'T_s/max':>8} {'T_s/sum':>8}"
    ]
    for r in data["rows"]:
        lines.append(
            f"{r['rate']:7} {r['fusion_mb']:>12} {r['t_c_ms']:8.1f} {r['t_x_ms']:8.1f} "
            f"{r['t_s_ms']:8.1f} {r['vs_max']:8.2f} {r['vs_sum']:8.2f}"
        )
    growth = _growth(data["rows"])
    if growth:
        lines.append("")
        lines.append("from the fastest link to each slower one: step growth / raw Allreduce growth")
        lines += [
            f"  {g['from']} -> {g['to']} {g['fusion_mb']:>8}: {g['ratio']:.2f}" for g in growth
        ]
    lines.append("")
    lines.append(
        f"{'link':7} {'alpha us':>9} {'beta ns/B':>10} {'GB/s':>7} {'GB/s at the largest':>20}"
        "   (fit: t = alpha + beta m)"
    )
    for name, link in data["links"].items():
        bandwidth = link.get("bandwidth_GBps")
        largest = max(link["ms"], key=int)
        lines.append(
            f"{name:7} {link['alpha_us']:9.1f} {link['beta_ns_per_byte']:10.4f} "
            f"{bandwidth if bandwidth is None else round(bandwidth, 3):>7} "
            f"{int(largest) / link['ms'][largest] / 1e6:20.3f}"
        )
    return "\n".join(lines)


def plot(data: dict, path: Path) -> str | None:
    """Step time against max(T_c, T_x) (left) and T_c + T_x (right): points
    on the diagonal of the left panel overlap fully, on the right's none."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'): no plot"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    configs = sorted({r["fusion_mb"] for r in data["rows"]}, key=lambda c: (c != "default", c))
    markers = dict(zip(configs, "o^sDvP*", strict=False))
    rates = sorted({r["rate"] for r in data["rows"]}, key=_rate_bits)
    colours = {rate: f"C{i}" for i, rate in enumerate(rates)}
    for ax, key, label in (
        (axes[0], "max", "max(compute, communication) ms"),
        (axes[1], "sum", "compute + communication ms"),
    ):
        top = 0.0
        for r in data["rows"]:
            x = max(r["t_c_ms"], r["t_x_ms"]) if key == "max" else r["t_c_ms"] + r["t_x_ms"]
            ax.scatter(
                x,
                r["t_s_ms"],
                marker=markers[r["fusion_mb"]],
                color=colours[r["rate"]],
                label=f"{r['rate']}, TD_FUSION_MB={r['fusion_mb']}",
            )
            top = max(top, x, r["t_s_ms"])
        top *= 1.15
        ax.plot([0, top], [0, top], color="grey", lw=0.8, label="step = x")
        if key == "max":
            ax.plot([0, top], [0, 1.1 * top], color="grey", lw=0.8, ls="--", label="1.10 x (goal)")
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        ax.set_xlabel(label)
        ax.set_ylabel("plugin step ms")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7, frameon=False)
    meta = data["meta"]
    fig.suptitle(
        f"{meta['params']:,}-parameter MLP, batch {meta['batch_per_rank']}/rank, 2 nodes x 1 rank, "
        f"MPICH/TCP, {meta['date']} ({meta.get('commit')})",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=100)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=["fit", "allreduce"], help=argparse.SUPPRESS)
    parser.add_argument("--plugin", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--sync", help=argparse.SUPPRESS)
    parser.add_argument("--rates", nargs="+", default=["1gbit", "10gbit"])
    parser.add_argument(
        "--fusion",
        nargs="+",
        default=["default", "1", "4", "16", "64"],
        help="TD_FUSION_MB values, each optionally with +NAME=VALUE settings for the plugin's ranks",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs of every row (medians)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="steps not timed (tracing)")
    parser.add_argument("--batch", type=int, default=1024, help="per-rank batch")
    parser.add_argument("--threads", type=int, default=1, help="TF compute threads per process")
    parser.add_argument("--tree", default=str(ROOT), help="checkout whose plugin runs")
    parser.add_argument(
        "--timeline", metavar="DIR", help="the plugin's runs write TD_TIMELINE files there"
    )
    parser.add_argument("--quick", action="store_true", help="--repeat 1 --fusion default")
    parser.add_argument("--out", default=str(ROOT / "results" / "overlap"))
    parser.add_argument("--plot-only", metavar="JSON", help="redraw OUT.png from a JSON; no runs")
    parser.add_argument(
        "--merge", nargs="+", metavar="JSON", help="join runs (e.g. one per rate) into OUT; no runs"
    )
    args = parser.parse_args()
    for config in args.fusion:
        if any("=" not in item for item in config.split("+")[1:]):
            parser.error(f"--fusion {config}: settings after the size go as +NAME=VALUE")
    if args.role == "fit":
        _fit_worker(args)
        return 0
    if args.role == "allreduce":
        _allreduce_worker(args)
        return 0
    if args.plot_only:
        data = json.loads(Path(args.plot_only).read_text())
        print(table(data))
        note = plot(data, Path(args.plot_only).with_suffix(".png"))
        print(note or f"wrote {Path(args.plot_only).with_suffix('.png')}")
        return 0
    if args.merge:
        data = merge([json.loads(Path(p).read_text()) for p in args.merge])
        data["meta"]["merged_from"] = args.merge
        return _write(data, Path(args.out))
    if args.quick:
        args.repeat, args.fusion = 1, ["default"]
    return _write(run(args), Path(args.out))


def _write(data: dict, out: Path) -> int:
    print(table(data))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    note = plot(data, out.with_suffix(".png"))
    print(note or f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the namespace harness's shaped link costs in CPU: the floor it puts
under benchmarks/overlap.py's step on this machine.

    python benchmarks/link_cpu.py [--rates 1gbit 10gbit] [--bursts 61kb 128kb] [--out results/link_cpu]

The two "nodes" of benchmarks/overlap.py are network namespaces of one
machine: the kernel work of their link (veth, bridge, tbf, TCP) and MPI's
own copies and sums run on the same cores as the ranks' compute. This
times a raw 25.3 MB allreduce (the MLP's gradient) over the shaped link,
1 rank per node, and reads the whole machine's busy CPU time from
/proc/stat around it. Each rank waits for its MPI_Iallreduce by testing it
and sleeping (`--sleep-us`) between tests, as the plugin's op does, so what
is counted is the work, not a spinning wait; `--sleep-us 0` spins in a
blocking MPI_Allreduce instead.

C_x, the machine's CPU per exchange, bounds the plugin's step from below
where compute already fills both cores (T_c: two processes at once):
T_s >= T_c + C_x / 2. Prints a table, writes OUT.json. Needs what
overlap.py needs (root, `ip netns`, `tc`); about a minute.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BYTES = 4 * 6316042  # benchmarks/overlap.py's MLP


def _worker(sleep_us: float, calls: int) -> None:
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    buffer = np.ones(BYTES // 4, np.float32)

    def busy_ticks() -> int:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return sum(fields) - fields[3] - fields[4]  # all but idle and iowait

    def exchange() -> None:
        if sleep_us <= 0:
            comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
            return
        request = comm.Iallreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
        while not request.Test():
            time.sleep(sleep_us * 1e-6)

    for _ in range(2):
        exchange()
    comm.Barrier()
    ticks, start = busy_ticks(), time.perf_counter()
    for _ in range(calls):
        exchange()
    comm.Barrier()
    wall, ticks = time.perf_counter() - start, busy_ticks() - ticks
    if comm.rank == 0:
        hz = 100  # USER_HZ: /proc/stat counts in 1/100 s on Linux
        result = {"wall_ms": 1e3 * wall / calls, "cpu_ms": 1e3 * ticks / hz / calls}
        print("RESULT " + json.dumps(result), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rates", nargs="+", default=["1gbit", "10gbit"])
    parser.add_argument(
        "--bursts", nargs="+", default=["auto"], help="tbf bucket; auto: overlap.py's"
    )
    parser.add_argument("--sleep-us", type=float, nargs="+", default=[300.0, 0.0])
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--out", default=str(HERE.parent / "results" / "link_cpu"))
    args = parser.parse_args()
    if args.worker:
        _worker(args.sleep_us[0], args.calls)
        return 0
    import overlap  # benchmarks/ is sys.path[0]

    Cluster = overlap.harness("link_cpu.py")  # noqa: N806 - the class
    rows = []
    with Cluster(nodes=2) as cluster:
        env = {**overlap._env(HERE.parent, 1), **Cluster.environment()}
        for rate in args.rates:
            for burst in args.bursts:
                tc = overlap._shape(cluster, rate, None if burst == "auto" else burst)
                for sleep_us in args.sleep_us:
                    command = cluster.mpiexec(ranks=2, per_node=1) + [
                        sys.executable,
                        str(Path(__file__)),
                        "--worker",
                        "--sleep-us",
                        str(sleep_us),
                        "--calls",
                        str(args.calls),
                    ]
                    proc = subprocess.run(command, env=env, capture_output=True, text=True)
                    result = overlap._result(proc, f"{rate} {tc}")
                    rows.append({"rate": rate, "tc": tc, "sleep_us": sleep_us, **result})
    print(f"{'link':24} {'wait':>10} {'wall ms':>8} {'C_x cpu-ms':>10}")
    for row in rows:
        wait = "spin" if row["sleep_us"] <= 0 else f"{row['sleep_us']:.0f} us"
        link = row["tc"].split("tbf ")[-1].split(" latency")[0]
        print(f"{link:24} {wait:>10} {row['wall_ms']:8.1f} {row['cpu_ms']:10.1f}")
    out = Path(args.out).with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"bytes": BYTES, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

